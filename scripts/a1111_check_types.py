"""Extra adapter-type files for scripts/a1111_check.py, made from the bed's kohya LoRA `a.safetensors` (same layer
names and shapes): a full (`diff`) file, an IA3 file (output channels; on Linear layers only, since A1111's IA3
broadcasts a conv's vector wrongly) and a DoRA file (a's factors with alpha = rank, kohya's per-input-channel
`dora_scale`). These are the types whose math A1111's built-in shares with ours, so their merged weights are compared
like the LoRA's; types where we differ on purpose (GLoRA's alpha, OFT's strength and bias, IA3 on convs) are not."""
from __future__ import annotations

import math
import os

FILES = ("full", "ia3", "dora")


def write_type_files(lora_dir: str, seed: int = 606) -> list[str]:
    """Writes the files that are not there yet; returns the names written."""
    import torch
    from safetensors.torch import load_file, save_file
    wanted = [n for n in FILES if not os.path.exists(os.path.join(lora_dir, f"{n}.safetensors"))]
    if not wanted:
        return []
    base = load_file(os.path.join(lora_dir, "a.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    layers = sorted(k[:-len(".lora_down.weight")] for k in base if k.endswith(".lora_down.weight"))
    files: dict[str, dict] = {n: {} for n in wanted}
    for key in layers:
        down, up = base[f"{key}.lora_down.weight"], base[f"{key}.lora_up.weight"]
        shape = (up.shape[0], *down.shape[1:])
        fan_in = math.prod(shape[1:])
        if "full" in files:
            files["full"][f"{key}.diff"] = (torch.randn(shape, generator=gen) * 0.03 / fan_in ** 0.5).half()
        if "ia3" in files and len(shape) == 2:
            files["ia3"][f"{key}.weight"] = (torch.randn(shape[0], generator=gen) * 0.05).half()
            files["ia3"][f"{key}.on_input"] = torch.tensor(False)
        if "dora" in files:
            rank = down.shape[0]
            files["dora"].update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                                  f"{key}.alpha": torch.tensor(float(rank)).half()})
            magnitude_shape = (1, shape[1], *([1] * (len(shape) - 2)))
            norm = (shape[0] * fan_in / shape[1]) ** 0.5 / fan_in ** 0.5  # a random weight's column norm
            files["dora"][f"{key}.dora_scale"] = ((1 + 0.05 * torch.randn(magnitude_shape, generator=gen)) * norm
                                                  ).half()
    meta = {"full": {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "full"}'},
            "ia3": {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "ia3"}'},
            "dora": {"ss_network_module": "networks.lora", "ss_network_args": '{"dora_wd": "True"}'}}
    for name, tensors in files.items():
        tmp = os.path.join(lora_dir, f".{name}.safetensors.tmp")
        save_file(tensors, tmp, metadata={**meta[name], "ss_output_name": name, "ss_base_model_version": "sd_v1"})
        os.replace(tmp, os.path.join(lora_dir, f"{name}.safetensors"))
    return wanted
