"""The extension under A1111's rules, without A1111: its folder is on sys.path only while its scripts load, and only
the module API that A1111 v1.10.1 has may be assumed (our host's extras are detected). scripts/a1111_check.py runs
the real thing; these catch the same mistakes cheaply."""
import ast
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import LORA_EXT_DIR, ROOT, tiny_lora_bytes

# install.py is run by A1111's launcher as a standalone script before anything loads, never imported later.
STANDALONE = {"install.py"}


def _extension_files() -> list[str]:
    found = []
    for folder, _, files in os.walk(LORA_EXT_DIR):
        found += [os.path.join(folder, f) for f in files if f.endswith(".py") and f not in STANDALONE]
    return sorted(found)


def _late_imports(path: str) -> list[str]:
    """Import statements that run after the module has loaded: inside a function or a class body, or a call to
    importlib.import_module/__import__ anywhere."""
    with open(path, encoding="utf8") as f:
        tree = ast.parse(f.read(), filename=path)
    late = []

    def visit(node, nested: bool):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and nested:
                late.append(f"{os.path.relpath(path, LORA_EXT_DIR)}:{child.lineno}")
            if isinstance(child, ast.Call):
                func = child.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in ("import_module", "__import__"):
                    late.append(f"{os.path.relpath(path, LORA_EXT_DIR)}:{child.lineno} ({name})")
            visit(child, inner)

    visit(tree, False)
    return late


def test_no_import_after_load_time():
    files = _extension_files()
    assert len(files) > 30
    late = [hit for path in files for hit in _late_imports(path)]
    assert late == [], "imports that fail in A1111 once the extension folder is off sys.path: " + ", ".join(late)


def test_late_import_checker_sees_them(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import os\ntry:\n    import json\nexcept ImportError:\n    json = None\n"
                      "def f():\n    import lora_hashing\nclass C:\n    from modules import shared\n"
                      "g = lambda: __import__('networks')\n")
    hits = [h.split(":")[-1] for h in _late_imports(str(sample))]
    assert hits == ["7", "9", "10 (__import__)"]


# The host loads the extension the way A1111 does (sys.path restored after its scripts load); then everything a
# user does later must work with the folder gone from sys.path and nothing of it imported lazily. A fresh process:
# in this one the test set-up keeps the folder on sys.path and every module imported already.
A1111_RULES_SCRIPT = textwrap.dedent("""
    import os, sys, json, time
    sys.path.insert(0, ROOT)
    from modules import extra_networks, scripts, script_callbacks, shared, ui_extra_networks
    extra_networks.initialize()
    extra_networks.register_default_extra_networks()
    scripts.load_scripts()
    assert LORA_EXT_DIR not in sys.path, "the host left the extension folder on sys.path"
    assert "networks" in sys.modules and "ui_extra_networks_lora" in sys.modules
    ui_extra_networks.initialize()
    script_callbacks.before_ui_callback()
    page = next(p for p in ui_extra_networks.extra_pages if p.name == "lora")
    import networks, lora_api, lora_infotext, lora_hashing  # already loaded: sys.modules, no path needed

    names = lambda: sorted(x["name"] for x in page.list_items())
    assert names() == ["first"], names()
    # a Lora added after start-up: the API refresh and a card for it
    with open(os.path.join(LORA_DIR, "later.safetensors"), "wb") as f:
        f.write(LATER)
    assert lora_api.refresh_loras() is None
    assert [x["name"] for x in lora_api.list_loras()] == ["first", "later"]
    page.refresh()
    assert names() == ["first", "later"], names()
    later = page.create_item("later", enable_filter=False)
    assert later["prompt_parts"][0] == {"text": "<lora:later_alias:"}, later["prompt_parts"]
    # a name missing at generation time is found by the quick rescan
    with open(os.path.join(LORA_DIR, "third.safetensors"), "wb") as f:
        f.write(THIRD)
    found, missing = networks.lora_discovery.find_networks(["third"])
    assert list(found) == ["third"] and missing == [], (found, missing)
    # hashes, aliases and infotext paste
    entry = networks.available_networks["later"]
    entry.read_hash()
    assert networks.available_network_hash_lookup[entry.shorthash] is entry
    assert entry.get_alias() == "later_alias"
    d = {"Prompt": "<lora:old:0.5>", "Lora hashes": f"old: {entry.shorthash}"}
    lora_infotext.infotext_pasted("", d)
    assert d["Prompt"] == "<lora:later_alias:0.5>", d
    # the editor: what the dialog shows and a save
    editor = page.create_user_metadata_editor(None, "txt2img")
    page.items = {x["name"]: x for x in page.list_items()}
    data = editor.editor_data("later")
    assert [f["key"] for f in data["fields"]][:3] == ["description", "sd version", "activation text"]
    editor.save_user_metadata("later", {"activation text": "hello", "preferred weight": 0.5})
    with open(os.path.join(LORA_DIR, "later.json"), encoding="utf8") as f:
        assert json.load(f)["activation text"] == "hello"
    # the A1111 editor's own writing (its gradio 3 dialog itself needs A1111: scripts/a1111_check.py)
    import ui_edit_user_metadata_a1111 as a1111_editor
    values = a1111_editor.clean_sidecar_values("d", "SD1", "act", 0.7, "", "n")
    a1111_editor.write_json_atomically(os.path.join(LORA_DIR, "first.json"),
                                       {**a1111_editor.read_sidecar(os.path.join(LORA_DIR, "first.json")), **values})
    lora_hashing.wait(30)
    print("OK")
""")


def test_extension_works_with_its_folder_off_sys_path(tmp_path):
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    (lora_dir / "first.safetensors").write_bytes(tiny_lora_bytes({"ss_output_name": "first"}))
    (lora_dir / "first.json").write_text('{"kept": 1}', encoding="utf8")
    later = tiny_lora_bytes({"ss_output_name": "later_alias"}, seed=1)
    header = (f"ROOT = {ROOT!r}\nLORA_EXT_DIR = {LORA_EXT_DIR!r}\nLORA_DIR = {str(lora_dir)!r}\n"
              f"LATER = {later!r}\nTHIRD = {tiny_lora_bytes(seed=2)!r}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SD_WEBUI_ARGS")}
    args = ["--data-dir", str(tmp_path), "--lora-dir", str(lora_dir), "--lyco-dir-backcompat",
            str(tmp_path / "LyCORIS")]
    run = subprocess.run([sys.executable, "-c", header + A1111_RULES_SCRIPT, *args], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout[-3000:] + run.stderr[-5000:]
    assert "Traceback" not in run.stderr, run.stderr[-5000:]
    with open(lora_dir / "first.json", encoding="utf8") as f:
        sidecar = f.read()
    assert '"kept": 1' in sidecar and '"activation text": "act"' in sidecar


# --- what other extensions rely on: A1111's layer names, multipliers changed behind load_networks' back ---------
def _a1111_names(ldm) -> dict:
    """A1111 v1.10.1's own naming (extensions-builtin/Lora/networks.assign_network_names_to_compvis_modules): the
    module path under sd_model.model, and under each text embedder's `wrapped` (index first when the model has a
    conditioner), dots replaced by underscores."""
    names = {}
    embedders = getattr(getattr(ldm, "conditioner", None), "embedders", None)
    if embedders:
        for i, embedder in enumerate(embedders):
            if hasattr(embedder, "wrapped"):
                for name, module in embedder.wrapped.named_modules():
                    names[f"{i}_{name.replace('.', '_')}"] = module
    else:
        tower = getattr(ldm.cond_stage_model, "wrapped", ldm.cond_stage_model)
        names.update({name.replace(".", "_"): m for name, m in tower.named_modules()})
    names.update({name.replace(".", "_"): m for name, m in ldm.model.named_modules()})
    return names


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_layers_carry_a1111_names(tiny_ldm_pair, family):
    import lora_layers

    ldm, _ = tiny_ldm_pair(family)
    layer_map = lora_layers.assign_network_names_to_compvis_modules(ldm)
    reference = _a1111_names(ldm)
    named = [m for m in layer_map.layers.values() if not isinstance(m, lora_layers.FusedSlice)]
    assert len(named) > 20
    for module in named:
        assert reference.get(module.network_layer_name) is module, module.network_layer_name
    assert ldm.network_layer_mapping["diffusion_model_time_embed_0"] is ldm.model.diffusion_model.time_embed[0]
    if family == "sd1":  # Regional Prompter's marker layer (the SD1 fixture has transformers 4 names, as A1111)
        assert "transformer_text_model_encoder_layers_0_self_attn_q_proj" in ldm.network_layer_mapping


def _plain_delta(path: str, layer_key: str, multiplier: float) -> torch.Tensor:
    """m · alpha/rank · up @ down of one kohya layer, from the file (plain Linear LoRA)."""
    from safetensors.torch import load_file
    tensors = load_file(path)
    base = "lora_unet_" + layer_key[len("unet."):].replace(".", "_")
    up, down = tensors[f"{base}.lora_up.weight"].double(), tensors[f"{base}.lora_down.weight"].double()
    alpha = float(tensors[f"{base}.alpha"])
    return multiplier * alpha / down.shape[0] * (up @ down)


def test_multipliers_changed_between_steps_are_applied(tiny_ldm_pair, write_lora):
    """loractl makes te/unet_multiplier properties of the sampling step; LoRA Block Weight and Regional Prompter
    assign them from their callbacks. The UNet's next call must run with the new weights, as in A1111."""
    import lora_layers
    import networks

    ldm, twin = tiny_ldm_pair("sd1")
    path = write_lora("live", twin, "sd1")
    networks.assign_network_names_to_compvis_modules(ldm)
    layer_map = lora_layers.get_layer_map(ldm)
    key = next(k for k, m in layer_map.layers.items() if k.startswith("unet.") and k.endswith("attn1.to_q"))
    layer = layer_map.layers[key]
    original = layer.weight.detach().double().clone()
    networks.load_networks(["live"], [1.0], [1.0], sd_model=ldm)
    torch.testing.assert_close(layer.weight.double() - original, _plain_delta(path, key, 1.0), rtol=1e-5, atol=1e-6)

    networks.loaded_networks[0].unet_multiplier = 0.25  # what another extension does between two steps
    unet = ldm.model.diffusion_model
    assert networks.apply_changed_multipliers(ldm) > 0
    torch.testing.assert_close(layer.weight.double() - original, _plain_delta(path, key, 0.25), rtol=1e-5,
                               atol=1e-6)
    assert networks.apply_changed_multipliers(ldm) == 0  # nothing changed since: nothing written

    te_layer = next(m for k, m in layer_map.layers.items() if k.startswith("text_encoder") and k.endswith("q_proj"))
    te_before = te_layer.weight.detach().clone()
    networks.loaded_networks[0].unet_multiplier = 0.0
    networks.loaded_networks[0].te_multiplier = 0.0
    hook_calls = [h for h in unet._forward_pre_hooks.values() if getattr(h, "__name__", "") == "_before_unet"]
    assert len(hook_calls) == 1
    hook_calls[0](unet, ())  # the UNet's forward pre-hook, as a sampling step would call it
    torch.testing.assert_close(layer.weight.double(), original, rtol=0, atol=0)
    # the prompt is encoded already: between steps the text encoder is left as it was (A1111 does the same)
    assert torch.equal(te_layer.weight, te_before)
    # LBW's start=: the weights it zeroed come back to what the text encoder still holds; the UNet follows
    networks.loaded_networks[0].unet_multiplier = 0.25
    networks.loaded_networks[0].te_multiplier = 1.0
    hook_calls[0](unet, ())
    torch.testing.assert_close(layer.weight.double() - original, _plain_delta(path, key, 0.25), rtol=1e-5,
                               atol=1e-6)
    networks.load_networks([], sd_model=ldm)
    assert torch.equal(layer.weight.double(), original)


def test_network_forward_uses_the_multiplier_set_just_before(tiny_ldm_pair, write_lora, monkeypatch):
    """Regional Prompter's Linear.forward sets a region's multipliers, then calls networks.network_forward with
    the unpatched forward (lora_functional on): the output must carry exactly that region's multiplier."""
    import lora_layers
    import networks

    from modules import shared

    ldm, twin = tiny_ldm_pair("sd1")
    path = write_lora("region", twin, "sd1")
    networks.assign_network_names_to_compvis_modules(ldm)
    layer_map = lora_layers.get_layer_map(ldm)
    key = next(k for k, m in layer_map.layers.items() if k.startswith("unet.") and k.endswith("attn2.to_q"))
    layer = layer_map.layers[key]
    monkeypatch.setitem(shared.opts.data, "lora_functional", True)
    networks.load_networks(["region"], [1.0], [1.0], sd_model=ldm)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    plain = torch.nn.functional.linear(x, layer.weight, layer.bias).double()
    for m in (0.5, -1.0):
        networks.loaded_networks[0].unet_multiplier = m
        with torch.no_grad():
            # RP's forward replacement runs inside the module call, so the layer's hooks run after it
            original_forward = layer.forward
            layer.forward = lambda inp: networks.network_forward(layer, inp, torch.nn.Linear.forward)
            try:
                y = layer(x)
            finally:
                layer.forward = original_forward
        expected = plain + x.double() @ _plain_delta(path, key, m).T
        torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-5)
    networks.load_networks([], sd_model=ldm)


def test_replaced_network_cache_is_emptied(tiny_sd1, write_lora):
    """LoRA Block Weight scales a loaded network's tensors in place and then empties A1111's cache by assigning
    `networks.networks_in_memory = {}`: the next load must read the file again, not reuse the scaled copy."""
    import networks

    write_lora("cached", tiny_sd1, "sd1")
    networks.load_networks(["cached"], [1.0], [1.0], sd_model=tiny_sd1)
    first = networks.loaded_networks[0]
    networks.load_networks(["cached"], [1.0], [1.0], sd_model=tiny_sd1)
    assert networks.loaded_networks[0] is first  # the same set again: the cached network
    networks.networks_in_memory = {}
    networks.load_networks(["cached"], [1.0], [1.0], sd_model=tiny_sd1)
    assert networks.loaded_networks[0] is not first
    assert networks.networks_in_memory is networks.lora_loader.networks_in_memory
    networks.load_networks([], sd_model=tiny_sd1)


def test_lbw_scaled_modules_are_merged_before_the_prompt_is_encoded(tiny_ldm_pair, write_lora):
    """LoRA Block Weight runs after activation: for each of `net.modules.keys()` (A1111's layer names, as A1111's
    dict is keyed) it picks a block ratio by name and assigns scaled tensors to the module (its lbw(), LoRA branch:
    `module.up_model.weight = Parameter(module.up_model.weight * ratio)`). A1111 merges in the layers' forwards, so
    the text encoder and the UNet run with the scaled network; removing it restores every weight bit for bit."""
    import lora_layers
    import networks

    ldm, twin = tiny_ldm_pair("sd1")
    path = write_lora("lbwnet", twin, "sd1")
    networks.assign_network_names_to_compvis_modules(ldm)
    layer_map = lora_layers.get_layer_map(ldm)
    originals = {k: m.weight.detach().clone() for k, m in layer_map.layers.items() if hasattr(m, "weight")}
    networks.load_networks(["lbwnet"], [1.0], [1.0], sd_model=ldm)
    net = networks.loaded_networks[0]
    picked = {"in": next(k for k in net.modules if k.startswith("unet.down_blocks.") and k.endswith("attn1.to_q")),
              "out": next(k for k in net.modules if k.startswith("unet.up_blocks.") and k.endswith("attn1.to_q")),
              "te": next(k for k in net.modules if k.startswith("text_encoder.") and k.endswith("q_proj"))}
    before = {k: layer_map.layers[k].weight.double() - originals[k].double() for k in picked.values()}

    keys = list(net.modules.keys())
    assert "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q" in keys
    ratios = {}
    for key in keys:  # LBW's lbw() with BASE 0.5, IN 0, the rest 1
        ratio = 0.0 if "diffusion_model_input_blocks_" in key else 0.5 if "encoder" in key else 1.0
        module = net.modules[key]
        module.up_model.weight = torch.nn.Parameter(module.up_model.weight * ratio)
        ratios[module.sd_key] = ratio
    assert ratios[picked["in"]] == 0.0 and ratios[picked["out"]] == 1.0 and ratios[picked["te"]] == 0.5

    text_encoder = layer_map.components["text_encoder"]
    hooks = [h for h in text_encoder._forward_pre_hooks.values()
             if getattr(h, "__name__", "") == "_before_text_encoder"]
    assert len(hooks) == 1
    hooks[0](text_encoder, ())  # the prompt is encoded: the change is merged first
    for key in picked.values():
        delta = layer_map.layers[key].weight.double() - originals[key].double()
        torch.testing.assert_close(delta, ratios[key] * before[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(before[picked["out"]], _plain_delta(path, picked["out"], 1.0), rtol=1e-5, atol=1e-6)
    assert networks.apply_changed_multipliers(ldm) == 0  # nothing changed since: nothing written

    networks.load_networks([], sd_model=ldm)
    for key, weight in originals.items():
        assert torch.equal(layer_map.layers[key].weight, weight), key


class _Script:
    def __init__(self, title: str, args_from: int):
        self._title, self.args_from = title, args_from

    def title(self) -> str:
        return self._title


@pytest.mark.parametrize("active", [True, False])
def test_lbw_syntax_is_left_to_lbw_when_its_script_is_active(active):
    """With LBW's *Active* box on, LBW applies `lbw=`, `w=`, `start=`, `stop=` and its positional preset by scaling
    the loaded modules; reading them here as well would apply the block weights twice."""
    import extra_networks_lora
    import lora_syntax

    from modules import extra_networks

    runner = type("Runner", (), {})()
    runner.alwayson_scripts = [_Script("Other", 0), _Script("LoRA Block Weight", 2)]
    p = type("P", (), {})()
    p.scripts, p.script_args = runner, [None, None, "preset text", active, False]
    assert extra_networks_lora.lbw_script_active(p) is active
    for items in (["x", "0.8", "lbw=OUTALL", "start=2"], ["x", "0.8", "OUTALL"]):
        tag = lora_syntax.parse_lora_params(extra_networks.ExtraNetworkParams(items=items),
                                            leave_lbw_syntax=extra_networks_lora.lbw_script_active(p))
        assert (tag.blocks is None and tag.window is None) is active, items
        assert tag.te == tag.unet == 0.8
    p.scripts = None
    assert extra_networks_lora.lbw_script_active(p) is False
