"""A1111 parity: A1111 replaces forward/_load_from_state_dict of torch.nn.Linear, Conv2d, GroupNorm, LayerNorm
and MultiheadAttention for the whole process so each layer merges its Loras lazily on first use.

This extension merges eagerly in networks.load_networks and notices foreign weight writes through tensor
version counters (lora_patcher), so it patches nothing. The class is kept so code that creates or undoes
`LoraPatches()` keeps working.
"""


class LoraPatches:
    def __init__(self):
        self.patched = False

    def undo(self) -> None:
        self.patched = False
