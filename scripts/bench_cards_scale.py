"""The Lora cards tab at scale, measured in a real browser (headless Debian Chromium through Playwright).

    venv/bin/python scripts/bench_cards_scale.py [--count 10000] [--new 200] [--data-dir DIR] [--keep]
                                                 [--json FILE] [--port N]

Creates COUNT small LoRA files (valid safetensors with kohya metadata, training tags, some previews, sidecars
and descriptions, spread over nested and hidden folders) in a fresh data folder, starts `webui.py` on it, and
reports, as measured in the page:

- cold start: the server's start with COUNT unseen files (headers read once, then cached by path/size/mtime);
- first paint: Lora tab click → first cards painted, the card data (COUNT cards) fetched and parsed on the way;
- search: one keystroke → the filtered grid painted (median and worst of a typed sequence);
- warm rescan: Refresh with nothing changed, and Refresh after NEW files were added;
- background hashing of the NEW files (progress from /sd_extra_networks/background-status) and the search
  latency while it runs;
- page memory: JS heap and DOM size (only the visible cards are in the DOM).

A screenshot goes to test-artifacts/bench_cards_scale.png. Exit status 1 when a target is missed (first paint
1 s median of three page loads, keystroke 50 ms at the 95th percentile of 75, warm rescan 1 s median of five).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
TARGETS = {"first_paint_ms": 1000.0, "keystroke_ms": 50.0, "warm_rescan_ms": 1000.0}

WORDS = ("red", "blue", "forest", "castle", "portrait", "anime", "photo", "night", "rain", "city", "knight",
         "dragon", "flower", "ocean", "smile", "armor", "neon", "sketch", "watercolor", "robot", "cat", "dog",
         "winter", "summer", "lantern", "mist", "golden", "shadow", "crystal", "desert")
FOLDERS = ("chars", "styles", "concepts/objects", "concepts/places", "poses", "clothes", ".archive")
PREVIEW_PNG = bytes.fromhex(  # a 1x1 grey PNG
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d4944415478da636060f80f0000010401005f0d9d0c0000000049454e44ae426082")


# --- the files ----------------------------------------------------------------------------------------------------
def safetensors_file(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str]) -> bytes:
    """A valid safetensors file written by the safetensors library: name → (dtype, shape, raw bytes)."""
    import safetensors.torch
    import torch

    dtypes = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}
    return safetensors.torch.save({name: torch.frombuffer(bytearray(data), dtype=dtypes[dtype]).reshape(shape)
                                   for name, (dtype, shape, data) in tensors.items()}, metadata=metadata)


def lora_file(index: int, rng: random.Random) -> tuple[bytes, str]:
    """One small kohya-style LoRA (rank 1 on two layers) and its family."""
    family = "sdxl" if index % 3 == 1 else "sd1"
    width = 2048 if family == "sdxl" else 768
    tags = {rng.choice(WORDS) + ("" if i else f" style{index % 97}"): rng.randint(1, 60) for i in range(8)}
    metadata = {
        "ss_output_name": f"{rng.choice(WORDS)}_{rng.choice(WORDS)}_{index}",
        "ss_base_model_version": "sdxl_base_v1-0" if family == "sdxl" else "sd_v1",
        "ss_network_module": "networks.lora", "ss_network_dim": "1", "ss_network_alpha": "1",
        "ss_sd_model_name": "bench.safetensors", "ss_training_started_at": str(1.7e9 + index),
        "ss_tag_frequency": json.dumps({"10_bench": tags}),
        "ss_dataset_dirs": json.dumps({"10_bench": {"n_repeats": 10, "img_count": 20}}),
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora" if family == "sdxl"
        else "stable-diffusion-v1/lora",
        "modelspec.title": f"bench {index}",
    }
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {
        f"{key}.lora_down.weight": ("F16", [1, width], rng.randbytes(2 * width)),
        f"{key}.lora_up.weight": ("F16", [320, 1], rng.randbytes(640)),
        f"{key}.alpha": ("F16", [], b"\x00\x3c"),
    }
    return safetensors_file(tensors, metadata), family


def make_loras(lora_dir: str, count: int, start: int = 0, seed: int = 0) -> list[str]:
    """COUNT files named `lora_<n>` in FOLDERS (100 per sub-folder); every 10th has a preview, every 7th a
    sidecar JSON, every 13th a `.txt` description. Returns the paths."""
    rng = random.Random(seed + start)
    paths = []
    for i in range(start, start + count):
        folder = os.path.join(lora_dir, *FOLDERS[i % len(FOLDERS)].split("/"), f"{(i // 100) % 20:02d}")
        os.makedirs(folder, exist_ok=True)
        data, _family = lora_file(i, rng)
        path = os.path.join(folder, f"lora_{i:05d}.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        base = path[:-len(".safetensors")]
        if i % 10 == 0:
            with open(base + ".preview.png", "wb") as f:
                f.write(PREVIEW_PNG)
        if i % 7 == 0:
            with open(base + ".json", "w", encoding="utf8") as f:
                json.dump({"activation text": f"trigger{i} {rng.choice(WORDS)}", "preferred weight": 0.7,
                           "description": f"sidecar description {i}"}, f)
        if i % 13 == 0:
            with open(base + ".txt", "w", encoding="utf8") as f:
                f.write(f"a text description of {rng.choice(WORDS)} number {i}")
        paths.append(path)
    return paths


# --- the server ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: str, port: int, log_path: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("SD_WEBUI_DATA_DIR", "SD_WEBUI_ARGS")}
    cmd = [sys.executable, os.path.join(ROOT, "webui.py"), "--data-dir", data_dir, "--port", str(port),
           "--lora-dir", os.path.join(data_dir, "models", "Lora")]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, process: subprocess.Popen, log_path: str, timeout: float = 600) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            with open(log_path, encoding="utf8", errors="replace") as f:
                raise RuntimeError(f"webui.py exited with {process.returncode}:\n{f.read()[-4000:]}")
        try:
            if requests.get(url + "/sdapi/v1/samplers", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"webui.py did not answer within {timeout:.0f}s")


# --- the browser --------------------------------------------------------------------------------------------------
PANE = "window.extraNetworksPanes.get('txt2img_lora_pane')"
# Runs in the page: sets the search text, then waits for the next frame to be painted.
SEARCH_JS = """async (queries) => {
    const pane = %s;
    const times = [];
    const handler = [];
    for (const q of queries) {
        const t0 = performance.now();
        pane.search.value = q;
        pane.search.dispatchEvent(new Event("input", {bubbles: true}));
        handler.push(performance.now() - t0);
        await new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)));
        times.push(performance.now() - t0);
    }
    return {times: times, handler: handler, shown: pane.view.length};
}""" % PANE
RESCAN_JS = """async () => {
    const pane = %s;
    const t0 = performance.now();
    await pane.load(true);
    await new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)));
    return {ms: performance.now() - t0, items: pane.items.length};
}""" % PANE
TAB_PAINT_JS = """async (name) => {
    const tab = Array.from(document.querySelectorAll("button[role=tab]")).find(b => b.textContent.trim() === name);
    const t0 = performance.now();
    tab.click();
    while (!document.querySelector("#txt2img_lora_cards .card")) {
        await new Promise(r => requestAnimationFrame(r));
        if (performance.now() - t0 > 30000) throw new Error("no card painted in 30 s");
    }
    await new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)));
    const pane = window.extraNetworksPanes.get('txt2img_lora_pane');
    return {paint: performance.now() - t0, data: pane.loadedAt - t0};
}"""
PAGE_STATS_JS = """() => ({
    heapMB: performance.memory ? performance.memory.usedJSHeapSize / 1048576 : null,
    domNodes: document.getElementsByTagName("*").length,
    cardsInDom: document.querySelectorAll("#txt2img_lora_cards .card").length,
    items: %s.items.length,
})""" % PANE


def wait_hashing_idle(url: str, timeout: float = 600) -> float:
    """Seconds until the server's background hashing is idle."""
    import requests

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        status = requests.get(url + "/sd_extra_networks/background-status?page=lora", timeout=10).json()["status"]
        if not status or not status.get("running"):
            break
        time.sleep(0.2)
    return time.perf_counter() - t0


def median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if s else float("nan")


def measure(url: str, lora_dir: str, new_count: int, count: int) -> dict:
    import requests
    from playwright.sync_api import sync_playwright

    results: dict = {"startup_hashing_wait_s": wait_hashing_idle(url)}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--enable-precise-memory-info"])
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("#txt2img_prompt textarea", timeout=120000)
        # gradio renders a tab's content when it is first selected: the card data loads then. Three page loads.
        paints, loads = [], []
        for attempt in range(3):
            if attempt:
                page.reload()
                page.wait_for_selector("#txt2img_prompt textarea", timeout=120000)
            first = page.evaluate(TAB_PAINT_JS, "Lora")
            paints.append(first["paint"])
            loads.append(first["data"])
        results["first_paint_ms"] = median(paints)
        results["first_paint_ms_all"] = [round(x) for x in paints]
        results["first_paint_data_loaded_ms_all"] = [round(x) for x in loads]

        queries = []
        for word in ("lora_0123", "castle", "trigger14"):
            queries += [word[:i] for i in range(1, len(word) + 1)]
        times, handler = [], []
        for _ in range(3):
            run = page.evaluate(SEARCH_JS, queries + [""])
            times += run["times"]
            handler += run["handler"]
        times.sort()
        results["keystroke_handler_ms_median"] = median(handler)
        results["keystroke_handler_ms_max"] = max(handler)
        results["keystroke_ms_median"] = median(times)
        results["keystroke_ms_p95"] = times[int(len(times) * 0.95)]
        results["keystroke_ms_max"] = times[-1]
        results["keystrokes_measured"] = len(times)
        rescans = [page.evaluate(RESCAN_JS)["ms"] for _ in range(5)]
        results["warm_rescan_ms"] = median(rescans)
        results["warm_rescan_ms_all"] = [round(x) for x in rescans]
        t0 = time.perf_counter()
        requests.post(url + "/sdapi/v1/refresh-loras", timeout=60).raise_for_status()
        results["api_refresh_ms"] = (time.perf_counter() - t0) * 1000

        make_loras(lora_dir, new_count, start=count, seed=1)
        rescan = page.evaluate(RESCAN_JS)
        results["rescan_with_new_files_ms"] = rescan["ms"]
        results["items_after_new_files"] = rescan["items"]
        # Hashing runs in the background: the page stays responsive meanwhile.
        during = page.evaluate(SEARCH_JS, ["c", "ca", "cas", "cast", ""])
        results["keystroke_ms_during_hashing_max"] = max(during["times"])
        t0 = time.perf_counter()
        progress_seen = set()
        while time.perf_counter() - t0 < 300:
            state = requests.get(url + "/sd_extra_networks/background-status?page=lora", timeout=10).json()["status"]
            progress_seen.add(state.get("done"))
            if not state.get("running") and not state.get("pending"):
                break
            time.sleep(0.2)
        results["hashing_wait_s"] = time.perf_counter() - t0
        results["hashing_progress_states_seen"] = len(progress_seen)
        results["hashing_final"] = state
        page.evaluate(SEARCH_JS, [""])
        results["page"] = page.evaluate(PAGE_STATS_JS)
        os.makedirs(ARTIFACTS, exist_ok=True)
        page.screenshot(path=os.path.join(ARTIFACTS, "bench_cards_scale.png"))
        results["page_errors"] = errors
        browser.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--new", type=int, default=200, help="files added before the second rescan")
    parser.add_argument("--data-dir", help="default: a new temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    data_dir = os.path.abspath(args.data_dir or tempfile.mkdtemp(prefix="lora-cards-bench-"))
    lora_dir = os.path.join(data_dir, "models", "Lora")
    os.makedirs(lora_dir, exist_ok=True)
    from modules.default_models import ensure_default_models
    ensure_default_models(os.path.join(data_dir, "models"))
    t0 = time.perf_counter()
    make_loras(lora_dir, args.count)
    print(f"wrote {args.count} LoRA files in {time.perf_counter() - t0:.1f}s under {lora_dir}", flush=True)

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(data_dir, "server.log")
    t0 = time.perf_counter()
    process = start_server(data_dir, port, log_path)
    try:
        wait_ready(url, process, log_path)
        results = {"count": args.count, "cold_server_start_s": time.perf_counter() - t0,
                   "load_average_at_start": os.getloadavg()}
        results.update(measure(url, lora_dir, args.new, args.count))
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        if not args.keep and not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)

    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    missed = [f"{k} {results[m]:.0f} > {limit:.0f}" for k, m, limit in (
        ("first paint", "first_paint_ms", TARGETS["first_paint_ms"]),
        ("keystroke", "keystroke_ms_p95", TARGETS["keystroke_ms"]),
        ("warm rescan", "warm_rescan_ms", TARGETS["warm_rescan_ms"])) if results[m] > limit]
    if results.get("page_errors"):
        missed.append(f"page errors: {results['page_errors']}")
    print("targets met" if not missed else "missed: " + "; ".join(missed))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
