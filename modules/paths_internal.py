"""Where things live on disk, decided before anything else is imported (A1111 module name)."""
import argparse
import os
import sys

script_path = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))

_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--data-dir", type=str, default=os.environ.get("SD_WEBUI_DATA_DIR", script_path))
_pre_opts, _ = _pre.parse_known_args(sys.argv[1:] if "pytest" not in sys.modules else [])
if _pre_opts.data_dir is None:
    _pre_opts.data_dir = script_path

data_path = os.path.abspath(_pre_opts.data_dir)
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
config_states_dir = os.path.join(script_path, "config_states")
default_output_dir = os.path.join(data_path, "outputs")
sd_configs_path = os.path.join(script_path, "configs")
