"""Loads extensions' `scripts/*.py` the way A1111 does: the extension folder is on sys.path while its scripts load."""
from __future__ import annotations

import importlib.util
import os
import sys
from collections import namedtuple

from modules import errors, extensions_preload

ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])

current_basedir: str | None = None
loaded_modules: dict[str, object] = {}
scripts_data: list = []


class Script:
    """Base class for A1111 webui scripts (only the parts extensions commonly touch)."""
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False

    def title(self) -> str:
        raise NotImplementedError

    def show(self, is_img2img: bool):
        return True

    def ui(self, is_img2img: bool):
        return []

    def process(self, p, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass


AlwaysVisible = object()


def basedir() -> str:
    """The folder of the extension whose script is being loaded (A1111 API)."""
    return current_basedir or os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def list_script_files() -> list[ScriptFile]:
    found = []
    for ext_dir in extensions_preload.extension_dirs():
        scripts_dir = os.path.join(ext_dir, "scripts")
        if not os.path.isdir(scripts_dir):
            continue
        for filename in sorted(os.listdir(scripts_dir)):
            if filename.endswith(".py"):
                found.append(ScriptFile(ext_dir, filename, os.path.join(scripts_dir, filename)))
    return found


def load_module(path: str):
    name = "extension_script_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_scripts() -> None:
    """Imports every extension script once; a failing script is reported and skipped."""
    global current_basedir
    for script_file in list_script_files():
        if script_file.path in loaded_modules:
            continue
        syspath = sys.path
        try:
            # Extensions import their own modules by bare name (`import networks`), as in A1111.
            sys.path = [script_file.basedir] + sys.path
            current_basedir = script_file.basedir
            loaded_modules[script_file.path] = load_module(script_file.path)
        except Exception:
            errors.report(f"Error loading script: {script_file.path}", exc_info=True)
        finally:
            # As in A1111, the folder is importable only while its scripts load: an extension that imports a
            # sibling later (in a callback) fails here exactly as it would there.
            sys.path = syspath
            current_basedir = None
