"""Checks this project's Lora extension inside a real AUTOMATIC1111 v1.10.1 against A1111's own built-in Lora.

    venv/bin/python scripts/a1111_check.py --webui /work/a1111-bed/webui [--python A1111_VENV/bin/python]
        [--builtin-backup DIR] [--third-party DIR ...] [--skip-browser] [--repeats 3] [--out DIR]
    venv/bin/python scripts/a1111_check.py --webui ... --use builtin|project      (only swap the Lora folder)

For each side (A1111's built-in Lora, then ours, each installed into `extensions-builtin/Lora`) it starts A1111 (CPU,
--no-half, API on 127.0.0.1) with a tiny probe extension (scripts/a1111_check_probe.py) and runs the same jobs
through the API: one LoRA, a multiplier change, three stacked, LoHa, LoKr, full, IA3, DoRA
(scripts/a1111_check_types.py), removal, lora_functional on,
lora_in_memory_limit 2, an A1111 checkpoint merge and a checkpoint switch with a Lora active. It compares
the weights after each set with the built-in's, checks every parameter bit for bit after each removal, compares
`Lora hashes` in the infotexts, and times each operation (min / median of --repeats; a job's time minus that of the
same job run again right after it, which changes nothing: both sides pay their whole Lora cost, A1111's lazy
per-layer merge included, and the sampling cancels out). Then a
headless-Chromium pass over A1111's page with ours (scripts/a1111_check_browser.py). Third-party extensions given
with --third-party are installed for a last pass on each side (see a1111_check_thirdparty.py). It prints one
markdown table; the Lora folder that was installed before is put back at the end.

The bed: `bash ../shared/a1111/build.sh build` (an offline A1111 with a random SD1.5 checkpoint and random
LoRA/LoHa/LoKr files). Take `flock /tmp/a1111.lock` around a run on a shared machine. This is a script, not a test.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import time

import a1111_check_browser
import a1111_check_thirdparty
import a1111_check_timing
import a1111_check_types
from a1111_check_bed import PROBE_NAME, Bed
from a1111_check_compare import changed, image_diff, max_diff, selection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS = {  # name → prompt tags, for the weight and restore checks
    "lora": "<lora:a:1>",
    "multipliers": "<lora:a:0.8:0.5>",
    "stacked": "<lora:a:1> <lora:b:0.7> <lora:c:0.5>",
    "loha": "<lora:loha:1>",
    "lokr": "<lora:lokr:1>",
    "mixed": "<lora:b:0.6> <lora:loha:0.5> <lora:lokr:-0.4>",
    "full": "<lora:full:0.8>",  # these three: scripts/a1111_check_types.py
    "ia3": "<lora:ia3:1>",
    "dora": "<lora:dora:0.7>",
    "mixed readers": "<lora:ia3:0.5> <lora:dora:1> <lora:a:0.5>",
}
ON_PURPOSE = {  # sets whose weights differ from the built-in's by design (README: where we differ on purpose)
    "mixed readers": "differs on purpose: A1111 applies networks in sequence, so its IA3 and DoRA read the weight "
                     "the LoRA already changed; ours computes every delta from the original",
}
TIMED = ["apply 1 LoRA", "change its multipliers", "apply 3 stacked", "remove all", "LoHa", "LoKr"]
MERGED_NAME = "lora-check-merged"


class Side:
    """One server run: A1111's built-in Lora or ours."""

    def __init__(self, bed: Bed, which: str, out: str, repeats: int):
        self.bed, self.which, self.out, self.repeats = bed, which, out, repeats
        self.times: dict[str, list[float]] = {k: [] for k in TIMED}
        self.inner: dict[str, list[float]] = {k: [] for k in TIMED}  # the same, in the Lora's weight code only
        self.write_floor: dict = {}  # one write of the weights a Lora touches, timed in the same server
        self.rss: dict[str, int] = {}
        self.rss_private: dict[str, int] = {}  # RssAnon: what is not mapped file pages (ours maps the checkpoint)
        self.restore_diffs: dict[str, int] = {}
        self.hashes: dict[str, str] = {}
        self.images: dict[str, bytes] = {}
        self.loaded_digests: dict[str, dict] = {}  # checkpoint → its parameters as loaded (before any Lora)
        self.names: list[str] = []
        self.browser: list = []  # (check, ok, detail) of the headless-Chromium pass
        self.server = None

    SAVED = ("times", "inner", "write_floor", "rss", "rss_private", "restore_diffs", "hashes", "loaded_digests",
             "names", "browser")

    def save(self) -> None:
        """The side's results, so a later failure (or --reuse) does not cost this run."""
        data = {k: getattr(self, k) for k in self.SAVED}
        data["images"] = {k: base64.b64encode(v).decode() for k, v in self.images.items()}
        tmp = os.path.join(self.out, f".side_{self.which}.json.tmp")
        with open(tmp, "w", encoding="utf8") as f:
            json.dump(data, f)
        os.replace(tmp, self.saved_path())

    def load(self) -> bool:
        if not os.path.exists(self.saved_path()):
            return False
        with open(self.saved_path(), encoding="utf8") as f:
            data = json.load(f)
        for k in self.SAVED:
            if k in data:  # a file from before a field was added keeps that field's default
                setattr(self, k, data[k])
        self.images = {k: base64.b64decode(v) for k, v in data["images"].items()}
        return True

    def saved_path(self) -> str:
        return os.path.join(self.out, f"side_{self.which}.json")

    def path(self, set_name: str) -> str:
        return os.path.join(self.out, f"{self.which}_{set_name}.safetensors")

    def job(self, prompt: str, key: str | None = None) -> tuple[float, dict]:
        seconds, info, image = self.server.txt2img(prompt)
        self.images[key or prompt] = image
        return seconds, info

    def timed_job(self, prompt: str) -> tuple[float, float]:
        """(the job's seconds through the API, seconds the server spent in the Lora's weight code during it)."""
        before = self.server.info().get("weight_seconds")
        seconds = self.job(prompt)[0]
        after = self.server.info().get("weight_seconds")
        return seconds, (after - before) if before is not None and after is not None else float("nan")

    def diff_count(self, reference: dict) -> int:
        return changed(reference, self.server.snapshot()["digests"])

    def run(self, checkpoint: str, checks) -> None:
        self.bed.use(self.which)
        log = os.path.join(self.out, f"server_{self.which}.log")
        print(f"--- {self.which}: starting A1111 (log {log})", flush=True)
        self.server = self.bed.start(checkpoint, log)
        try:
            info = self.server.info()
            ours = "lora_discovery" in open(info["networks_module"], encoding="utf8").read()
            if ours != (self.which == "project"):
                raise SystemExit(f"{self.which}: A1111 loaded {info['networks_module']}, not the expected Lora")
            self.server.options(lora_functional=False, lora_in_memory_limit=0)
            self.job("")
            self.note_rss("no Lora")
            checks(self)
        finally:
            self.server.stop()
        self.save()

    def note_rss(self, key: str) -> None:
        info = self.server.info()
        self.rss[key] = max(self.rss.get(key, 0), info["rss"])
        if "rss_anon" in info:
            self.rss_private[key] = max(self.rss_private.get(key, 0), info["rss_anon"])

    # --- the checks, in order -----------------------------------------------------------------------------------
    def timings(self) -> None:
        """Each operation's job is followed by the same job again (which changes nothing): the operation's cost is
        the difference of the two, so the sampling and the machine's load at that moment cancel out."""
        base: list[float] = []
        three = "<lora:a:1> <lora:b:1> <lora:c:1>"
        steps = [("apply 1 LoRA", "<lora:a:1>"), ("change its multipliers", "<lora:a:0.8:0.5>"),
                 ("apply 3 stacked", three), ("remove all", ""), ("LoHa", "<lora:loha:1>"), (None, ""),
                 ("LoKr", "<lora:lokr:1>"), (None, "")]
        for r in range(self.repeats):
            print(f"    timing round {r + 1}/{self.repeats}", flush=True)
            self.job("")
            for op, prompt in steps:
                seconds, inner = self.timed_job(prompt)
                if op is None:
                    continue
                again, inner_again = self.timed_job(prompt)
                base.append(again)
                self.times[op].append(max(0.0, seconds - again))
                self.inner[op].append(inner - inner_again)
                if op in ("apply 1 LoRA", "apply 3 stacked", "remove all"):
                    self.note_rss(op)
        self.times["(a job that changes nothing)"] = base
        self.measure_write_floor()

    def measure_write_floor(self) -> None:
        """A removal's floor in this server: one write of the bytes of the parameters `<lora:a:1>` changes."""
        self.job("")
        before = self.server.snapshot()["digests"]
        self.job("<lora:a:1>")
        after = self.server.snapshot()["digests"]
        self.job("")
        touched = [k for k, v in before.items() if after.get(k) != v]
        self.write_floor = self.server.post("/lora-check/write-floor", {"names": touched, "repeats": self.repeats})

    def weights(self, originals: dict) -> None:
        for set_name, prompt in SETS.items():
            print(f"    weights: {set_name}", flush=True)
            _, info = self.job(prompt)
            self.hashes[set_name] = _lora_hashes(info)
            self.server.snapshot(self.path(set_name), self.names)
            self.job("")
            self.restore_diffs[set_name] = self.diff_count(originals)

    def functional(self, originals: dict) -> None:
        self.server.options(lora_functional=True)
        try:
            self.job(SETS["stacked"], key="functional")
            self.restore_diffs["lora_functional: weights written"] = self.diff_count(originals)
            self.job("")
        finally:
            self.server.options(lora_functional=False)
        self.restore_diffs["lora_functional (then off)"] = self.diff_count(originals)

    def memory_limit(self, originals: dict) -> None:
        self.server.options(lora_in_memory_limit=2)
        try:
            for prompt in ("<lora:a:1>", "<lora:b:1>", "<lora:a:1>"):
                self.job(prompt)
            self.server.snapshot(self.path("in_memory_limit"), self.names)
            self.job("")
        finally:
            self.server.options(lora_in_memory_limit=0)
        self.restore_diffs["in_memory_limit 2"] = self.diff_count(originals)

    def checkpoint_switch(self, originals: dict, base_title: str) -> None:
        models = {m["model_name"]: m["title"] for m in self.server.get("/sdapi/v1/sd-models")}
        merged = models.get(MERGED_NAME)
        if merged is None:
            print("    A1111 checkpoint merger (weighted sum, 0.3)", flush=True)
            merged = self.server.post("/lora-check/merge", {"name": MERGED_NAME, "multiplier": 0.3})["title"]
            self.server.post("/sdapi/v1/refresh-checkpoints")
        self.job("<lora:a:1>")
        self.server.options(sd_model_checkpoint=merged)  # switched with a Lora merged into the old weights
        self.job("")
        merged_originals = self.server.snapshot()["digests"]
        self.loaded_digests["merged"] = merged_originals
        self.job("<lora:a:1>")
        self.server.snapshot(self.path("merged_model"), self.names)
        self.job("")
        self.restore_diffs["merged model"] = self.diff_count(merged_originals)
        self.server.options(sd_model_checkpoint=base_title)
        self.job("")
        self.restore_diffs["switched back"] = self.diff_count(originals)


def _lora_hashes(info: dict) -> str:
    m = re.search(r'Lora hashes: "[^"]*"', (info.get("infotexts") or [""])[0])
    return m.group(0) if m else ""


def all_checks(side: Side, base_title: str) -> None:
    originals = side.server.snapshot()["digests"]
    side.loaded_digests["base"] = originals
    side.names = selection(originals)
    side.timings()
    side.weights(originals)
    side.functional(originals)
    side.memory_limit(originals)
    side.checkpoint_switch(originals, base_title)


def table(builtin: Side, ours: Side, browser: list[tuple[str, bool, str]], third: list[tuple[str, str, str, str]],
          tolerance: float) -> str:
    rows = ["| check | A1111 built-in | ours in A1111 | result |", "|---|---|---|---|"]
    rows += a1111_check_timing.timing_rows(builtin, ours, TIMED)
    for set_name in [*SETS, "in_memory_limit", "merged_model"]:
        if not (os.path.exists(builtin.path(set_name)) and os.path.exists(ours.path(set_name))):
            continue
        worst, scale = max_diff(builtin.path(set_name), ours.path(set_name))
        verdict = "ok" if worst <= tolerance else ON_PURPOSE.get(set_name, "DIFFERENT")
        rows.append(f"| weights `{SETS.get(set_name, set_name)}`: max abs difference to the built-in's "
                    f"({len(builtin.names)} tensors) | | {worst:.2e} (largest weight {scale:.2f}) | {verdict} |")
    if os.path.exists(ours.path("lora")) and os.path.exists(ours.path("in_memory_limit")):
        same = max_diff(ours.path("lora"), ours.path("in_memory_limit"))[0] == 0.0
        rows.append(f"| `<lora:a:1>` from the in-memory cache = read from the file | | "
                    f"{'bitwise equal' if same else 'DIFFERENT'} | {'ok' if same else 'FAIL'} |")
    for key in [k for k in ours.restore_diffs if k in builtin.restore_diffs] or list(ours.restore_diffs):
        b, o = builtin.restore_diffs.get(key, "-"), ours.restore_diffs.get(key, "-")
        label = key if key.startswith("lora_functional: ") else f"restore after {key}"
        rows.append(f"| {label}: parameters not bit-exact | {b} | {o} | {'ok' if o == 0 else 'FAIL'} |")
    for model, b in builtin.loaded_digests.items():
        o = ours.loaded_digests.get(model)
        if o:
            differ = changed(b, o)
            rows.append(f"| {model} checkpoint as loaded (the merged one with a Lora active): parameters not as "
                        f"the built-in's load | | {differ} | {'ok' if differ == 0 else 'FAIL'} |")
    for set_name in SETS:
        b, o = builtin.hashes.get(set_name, ""), ours.hashes.get(set_name, "")
        if not b and not o:
            continue
        rows.append(f"| infotext `{SETS[set_name]}` | `{b}` | `{o}` | {'same' if b == o and b else 'DIFFERENT'} |")
    for key, label in ((SETS["stacked"], "merged"), ("functional", "lora_functional")):
        if key in builtin.images and key in ours.images:
            rows.append(f"| image `{SETS['stacked']}` ({label}): mean abs pixel difference to the built-in's | | "
                        f"{image_diff(builtin.images[key], ours.images[key]):.3f} / 255 | |")
    for name, ok, detail in browser:
        rows.append(f"| browser (ours): {name} | | {detail} | {'ok' if ok else 'FAIL'} |")
    for name, b, o, verdict in third:
        rows.append(f"| {name} | {b} | {o} | {verdict} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--webui", required=True, help="the A1111 folder (launch.py)")
    parser.add_argument("--python", help="A1111's venv python (default: ../venv/bin/python next to --webui)")
    parser.add_argument("--builtin-backup", help="where A1111's own Lora folder is kept (default: ../Lora-builtin)")
    parser.add_argument("--hf-home", help="HF_HOME with the offline CLIP tokenizer (default: ../hf if present)")
    parser.add_argument("--checkpoint", help="checkpoint to start with (default: the first in models/Stable-diffusion)")
    parser.add_argument("--port", type=int, default=7893)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "a1111_check"))
    parser.add_argument("--tolerance", type=float, default=2e-4, help="largest weight difference to the built-in")
    parser.add_argument("--skip-browser", action="store_true")
    parser.add_argument("--only", choices=["builtin", "project"], help="run one side only (no comparison)")
    parser.add_argument("--third-party", nargs="*", default=[], help="extension folders to check with both")
    parser.add_argument("--third-party-together", action="store_true",
                        help="also one run with all --third-party extensions installed at once")
    parser.add_argument("--keep-dumps", action="store_true", help="keep the saved weights in --out")
    parser.add_argument("--timings-only", action="store_true",
                        help="only the timings and memory (no weight, restore, hash or browser checks)")
    parser.add_argument("--reuse", action="store_true",
                        help="take a side's results from an earlier run in --out (side_*.json and its weight dumps)"
                             " instead of running it again")
    parser.add_argument("--skip-main", action="store_true", help="only the third-party pass")
    parser.add_argument("--use", choices=["builtin", "project"], help="only install that Lora folder and exit")
    args = parser.parse_args()

    webui = os.path.abspath(args.webui)
    parent = os.path.dirname(webui)
    bed = Bed(webui=webui, python=args.python or os.path.join(parent, "venv", "bin", "python"),
              project_lora=os.path.join(ROOT, "extensions-builtin", "Lora"),
              builtin_backup=os.path.abspath(args.builtin_backup or os.path.join(parent, "Lora-builtin")),
              port=args.port, hf_home=args.hf_home or (os.path.join(parent, "hf")
                                                       if os.path.isdir(os.path.join(parent, "hf")) else None))
    if args.use:
        bed.use(args.use)
        print(f"{bed.lora_slot} now holds the {args.use} Lora extension")
        return
    os.makedirs(args.out, exist_ok=True)
    before = bed.installed()
    checkpoint = args.checkpoint or _first_checkpoint(webui)
    base_title = None
    sides = {name: Side(bed, name, args.out, args.repeats) for name in ("builtin", "project")}
    third_results: list = []
    bed.add_probe()
    written = a1111_check_types.write_type_files(bed.lora_dir)
    if written:
        print(f"wrote {', '.join(written)} into {bed.lora_dir}", flush=True)
    started = time.time()
    try:
        for name in ([] if args.skip_main else ["builtin", "project"] if not args.only else [args.only]):
            side = sides[name]
            if args.reuse and side.load():
                print(f"--- {name}: results of an earlier run ({side.saved_path()})", flush=True)
                continue

            def checks(s: Side) -> None:
                nonlocal base_title
                base_title = base_title or s.server.info()["checkpoint"]
                if args.timings_only:
                    s.timings()
                    s.functional(s.server.snapshot()["digests"])
                    return
                all_checks(s, base_title)
                if s.which == "project" and not args.skip_browser:
                    s.browser = a1111_check_browser.run(s.server.url, bed.lora_dir, args.out)

            side.run(checkpoint, checks)
        if args.third_party:
            try:
                third_results = a1111_check_thirdparty.run(bed, args.third_party, checkpoint, args.out,
                                                            [n for n in ("builtin", "project")
                                                             if not args.only or n == args.only],
                                                            together=args.third_party_together,
                                                            reuse=args.reuse)
            except Exception as e:  # the main table is still worth printing
                third_results = [("third party", "", "", f"the run failed: {type(e).__name__}: {e}")]
    finally:
        bed.remove_extension(PROBE_NAME)
        _remove_merged(webui)
        if before in ("builtin", "project"):
            bed.use(before)
    browser_results = sides["project"].browser
    text = table(sides["builtin"], sides["project"], browser_results, third_results, args.tolerance)
    if not args.keep_dumps and not args.reuse:
        for name in os.listdir(args.out):
            if name.endswith(".safetensors"):
                os.remove(os.path.join(args.out, name))
    print(f"\n{text}\n")
    print(f"(A1111 v1.10.1 on {os.cpu_count()} CPU cores, --no-half; {args.repeats} repeats; "
          f"{time.time() - started:.0f}s in all)")


def _first_checkpoint(webui: str) -> str:
    folder = os.path.join(webui, "models", "Stable-diffusion")
    found = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".ckpt"))
                   and not f.startswith(MERGED_NAME))
    if not found:
        raise SystemExit(f"no checkpoint in {folder}")
    return os.path.join(folder, found[0])


def _remove_merged(webui: str) -> None:
    folder = os.path.join(webui, "models", "Stable-diffusion")
    for f in os.listdir(folder):
        if f.startswith(MERGED_NAME):
            os.remove(os.path.join(folder, f))


if __name__ == "__main__":
    main()
