"""Loading kohya LoRA/LoCon files onto tiny SD1/SDXL diffusers models and removing them again."""
import networks
import pytest
import torch


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("locon", [False, True])
def test_kohya_file_matches_every_key_and_restores_bit_exactly(request, write_lora, family, locon):
    model = request.getfixturevalue(f"tiny_{family}")
    name = f"{family}_{'locon' if locon else 'lora'}"
    write_lora(name, model, family=family, locon=locon)
    original = {k: v.clone() for comp in model.components().values() if comp is not None
                for k, v in comp.state_dict().items()}

    report = networks.load_networks([name], [1.0], [1.0], [None], sd_model=model)
    net = report.networks[0]
    assert net.modules and not net.unmatched_keys and not net.apply_errors and not net.load_errors
    assert report.layers_written == len(net.modules)

    networks.load_networks([], sd_model=model)
    restored = {k: v for comp in model.components().values() if comp is not None
                for k, v in comp.state_dict().items()}
    assert restored.keys() == original.keys()
    for key, value in restored.items():
        assert torch.equal(value, original[key]), key
