"""Times Lora operations inside a running A1111 (or this host) through its HTTP API, for any Lora extension.

Each operation is one `POST /sdapi/v1/txt2img` (1 step, 64x64, fixed seed) whose prompt holds the tags; its cost is
the request's wall time minus the median of plain requests (no tags) measured in the same run, so it covers what
the extension does at job start *and* inside the forward pass (A1111's built-in merges lazily there). Operations,
in this order each repeat:

  apply 1       none → <lora:a:1>                multiplier  <lora:a:1> → <lora:a:0.8:0.5> (te 0.8, unet 0.5)
  remove 1      → none                           apply 3     none → <lora:a:1> <lora:b:1> <lora:c:1>
  remove 3      → none                           loha, lokr  none → <lora:loha:1> / <lora:lokr:1>, then none

Prints min / median (seconds) per op, and the server's RSS (VmRSS of --pid, or of the process listening on the
port when /proc allows) after the run. Lora names are the bed's (shared/a1111/tools/make_loras.py); override
with --names a,b,c,loha,lokr.

usage: python scripts/bench_a1111_api.py [--url http://127.0.0.1:7893] [--repeats 3] [--pid PID] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request

OPS = ("apply 1", "multiplier", "remove 1", "apply 3", "remove 3", "loha", "remove loha", "lokr", "remove lokr")


def post(url: str, path: str, payload: dict, timeout: float = 900) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def txt2img(url: str, prompt: str) -> tuple[float, dict]:
    payload = {"prompt": prompt, "negative_prompt": "", "steps": 1, "width": 64, "height": 64, "seed": 1,
               "batch_size": 1, "n_iter": 1, "cfg_scale": 1, "sampler_name": "Euler", "send_images": False,
               "save_images": False}
    t = time.perf_counter()
    res = post(url, "/sdapi/v1/txt2img", payload)
    return time.perf_counter() - t, res


def vm_rss(pid: int | None) -> int | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run(url: str, repeats: int, names: list[str], plain_runs: int = 5) -> dict:
    a, b, c, loha, lokr = names
    for _ in range(2):  # warm-up: first requests compile/allocate
        txt2img(url, "a photo")
    plain = [txt2img(url, "a photo")[0] for _ in range(plain_runs)]
    base = statistics.median(plain)
    steps = [("apply 1", f"a photo <lora:{a}:1>"), ("multiplier", f"a photo <lora:{a}:0.8:0.5>"),
             ("remove 1", "a photo"), ("apply 3", f"a photo <lora:{a}:1> <lora:{b}:1> <lora:{c}:1>"),
             ("remove 3", "a photo"), ("loha", f"a photo <lora:{loha}:1>"), ("remove loha", "a photo"),
             ("lokr", f"a photo <lora:{lokr}:1>"), ("remove lokr", "a photo")]
    times: dict[str, list[float]] = {op: [] for op, _ in steps}
    infos = {}
    for _ in range(repeats):
        for op, prompt in steps:
            t, res = txt2img(url, prompt)
            times[op].append(t - base)
            infos[op] = res.get("info", "")
        txt2img(url, "a photo")  # settle
    plain += [txt2img(url, "a photo")[0] for _ in range(plain_runs)]
    return {"plain request s": statistics.median(plain), "plain min s": min(plain), "times": times,
            "infotext apply 3": infos.get("apply 3", "")[:2000]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:7893")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--names", default="a,b,c,loha,lokr")
    parser.add_argument("--pid", type=int, default=None, help="server process id, for its RSS")
    parser.add_argument("--label", default="")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = run(args.url, args.repeats, args.names.split(","))
    result["label"] = args.label
    result["rss"] = vm_rss(args.pid)
    print(f"{args.label}: plain request {result['plain request s']:.2f} s (min {result['plain min s']:.2f})")
    for op in OPS:
        v = result["times"][op]
        print(f"  {op:12s} min {min(v):6.2f}  median {statistics.median(v):6.2f}   all {['%.2f' % x for x in v]}")
    if result["rss"]:
        print(f"  server RSS {result['rss'] / 2 ** 30:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
