"""A1111 module name: re-exports the paths of paths_internal."""
from modules.paths_internal import (  # noqa: F401
    data_path,
    default_output_dir,
    extensions_builtin_dir,
    extensions_dir,
    models_path,
    script_path,
    sd_configs_path,
)
