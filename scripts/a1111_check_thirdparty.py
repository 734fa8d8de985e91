"""Third-party extensions that use A1111's Lora internals, for scripts/a1111_check.py --third-party DIR...: each
folder is installed into A1111's extensions/ for one more server run per side (A1111's built-in Lora, then ours),
the same jobs run on both, and the results are compared: the weights after the job, the image, exact restore
afterwards, and errors the server logged.

Known extensions (by folder name) and what is checked:
- sd-webui-loractl (cheald): `<lora:a:0@0,1@1>` over 4 steps. loractl subclasses extra_networks_lora.ExtraNetworkLora
  and turns Network.te_multiplier/unet_multiplier into properties of the sampling step.
- sd-webui-lora-block-weight (hako-mikan): `<lora:a:1:lbw=OUTALL>` with its script active (it scales the loaded
  networks' tensors after activation) and `start=2` (it sets the multipliers from a cfg_denoiser callback).
- sd-webui-regional-prompter (hako-mikan): Latent mode with a Lora per region (`lora_functional`,
  `network_layer_name`, its own Linear.forward calling networks.network_forward).
"""
from __future__ import annotations

import base64
import json
import os

from a1111_check_bed import Bed, StartError
from a1111_check_compare import changed, image_diff, max_diff, selection

RP_LATENT = [True, False, "Matrix", "Vertical", "Mask", "Prompt", "1,1", "", False, False, False, "Latent", False,
             "0", "0", "0", "", "0", "0", False]
LBW_ACTIVE = {"LoRA Block Weight": {"args": [None, True]}}  # its presets (None: the defaults), Active
JOBS = {  # folder name → [(job name, prompt, extra txt2img fields)]
    "sd-webui-loractl": [("loractl keyframes", "<lora:a:0@0,1@1>", {"steps": 4})],
    "sd-webui-lora-block-weight": [
        ("LBW lbw=OUTALL", "<lora:a:1:lbw=OUTALL>", {"alwayson_scripts": LBW_ACTIVE}),
        ("LBW start=2", "<lora:a:1:start=2>", {"steps": 4, "alwayson_scripts": LBW_ACTIVE}),
    ],
    "sd-webui-regional-prompter": [
        ("Regional Prompter, Latent, a Lora per region", "red <lora:a:1> BREAK blue <lora:b:1>",
         {"steps": 2, "width": 128, "alwayson_scripts": {"Regional Prompter": {"args": RP_LATENT}}}),
    ],
}


def _log_errors(path: str, start: int) -> list[str]:
    with open(path, encoding="utf8", errors="replace") as f:
        f.seek(start)
        lines = f.read().splitlines()
    return [line.strip() for i, line in enumerate(lines) if "Traceback" in line or line.startswith("*** Error")
            or (i > 0 and "Traceback" in lines[i - 1])][:6]


def _run_side(bed: Bed, side: str, folders: list[str], checkpoint: str, out_dir: str, label: str) -> dict:
    bed.use(side)
    names = [os.path.basename(os.path.normpath(f)) for f in folders]
    for folder, name in zip(folders, names, strict=True):
        bed.add_extension(name, folder)
    log = os.path.join(out_dir, f"server_{side}_{label}.log")
    print(f"--- {side} with {', '.join(names)}: starting A1111 (log {log})", flush=True)
    results = {}
    try:
        server = bed.start(checkpoint, log)
    except StartError as e:  # reported for each of the group's jobs; the other groups still run
        for name in names:
            bed.remove_extension(name)
        return {f"{job}{' (all installed)' if len(names) > 1 else ''}": {"error": f"A1111 did not start: {e}",
                                                                          "log errors": _log_errors(log, 0)}
                for name in names for job, _, _ in JOBS.get(name, [])}
    try:
        server.options(lora_functional=False, lora_in_memory_limit=0)
        server.txt2img("")
        originals = server.snapshot()["digests"]
        tensors = selection(originals)
        for name in names:
            for job, prompt, extra in JOBS.get(name, []):
                print(f"    {job}", flush=True)
                start = os.path.getsize(log)
                entry = {"error": None}
                try:
                    _, info, image = server.txt2img(prompt, **extra)
                    entry["image"] = image
                    entry["file"] = os.path.join(out_dir, f"{side}_{label}_{len(results)}.safetensors")
                    server.snapshot(entry["file"], tensors)
                    server.txt2img("")
                    entry["not restored"] = changed(originals, server.snapshot()["digests"])
                except Exception as e:  # reported in the table
                    entry["error"] = str(e)[:200]
                entry["log errors"] = _log_errors(log, start)
                results[f"{job}{' (all installed)' if len(names) > 1 else ''}"] = entry
    finally:
        server.stop()
        for name in names:
            bed.remove_extension(name)
    return results


def _saved(out_dir: str, side: str, group: list[str]) -> str:
    names = "+".join(os.path.basename(os.path.normpath(f)) for f in group)
    return os.path.join(out_dir, f"thirdparty_{side}_{names}.json")


def run(bed: Bed, folders: list[str], checkpoint: str, out_dir: str, sides: list[str],
        together: bool = False, reuse: bool = False) -> list[tuple]:
    """[(check, built-in result, ours, verdict)] for the table: each extension alone in its own server run, and
    with `together` once more all of them installed at once. Each side's results are saved in `out_dir`;
    `reuse` takes them from there (with their weight dumps) instead of running that side again."""
    groups = [[f] for f in folders] + ([folders] if together and len(folders) > 1 else [])
    by_side: dict[str, dict] = {side: {} for side in sides}
    for i, group in enumerate(groups):
        for side in sides:
            saved = _saved(out_dir, side, group)
            if reuse and os.path.exists(saved):
                with open(saved, encoding="utf8") as f:
                    results = {job: {**e, "image": base64.b64decode(e["image"]) if e.get("image") else None}
                               for job, e in json.load(f).items()}
                if all(e.get("file") is None or os.path.exists(e["file"]) for e in results.values()):
                    print(f"--- {side} with {os.path.basename(saved)}: results of an earlier run", flush=True)
                    by_side[side].update(results)
                    continue
            results = _run_side(bed, side, group, checkpoint, out_dir, f"thirdparty{i}")
            with open(saved, "w", encoding="utf8") as f:
                json.dump({job: {**e, "image": base64.b64encode(e["image"]).decode() if e.get("image") else None}
                           for job, e in results.items()}, f)
            by_side[side].update(results)
    rows = []
    for job in dict.fromkeys(j for res in by_side.values() for j in res):
        b, o = by_side.get("builtin", {}).get(job), by_side.get("project", {}).get(job)

        def brief(entry) -> str:
            if entry is None:
                return "-"
            if entry["error"]:
                return f"job failed: {entry['error']}"
            text = f"restore: {entry['not restored']} not exact"
            return text + (f"; log: {' / '.join(entry['log errors'])[:160]}" if entry["log errors"] else "")

        verdict = ""
        if b and o and not b["error"] and not o["error"]:
            worst, scale = max_diff(b["file"], o["file"])
            pixels = image_diff(b["image"], o["image"])
            verdict = f"weights differ by {worst:.1e} (largest {scale:.2f}); image {pixels:.2f}/255"
        rows.append((f"third party: {job}", brief(b), brief(o), verdict))
    return rows
