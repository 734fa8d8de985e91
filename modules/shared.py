"""Process-wide state under A1111's module name: cmd_opts, opts, state, sd_model."""
import os
import sys
import types

from modules import paths_internal, shared_cmd_options, shared_options, shared_state, upscaler
from modules.options import OptionInfo, Options, options_section  # noqa: F401  (re-exported for extensions)

cmd_opts = shared_cmd_options.cmd_opts
parser = shared_cmd_options.parser

data_path = os.path.abspath(cmd_opts.data_dir)
models_path = os.path.abspath(cmd_opts.models_dir) if cmd_opts.models_dir else os.path.join(data_path, "models")
paths_internal.data_path = data_path
paths_internal.models_path = models_path
script_path = paths_internal.script_path
config_filename = cmd_opts.ui_settings_file
if os.path.dirname(config_filename) == paths_internal.script_path and data_path != paths_internal.script_path:
    config_filename = os.path.join(data_path, "config.json")

options_templates = shared_options.options_templates
opts = Options(options_templates)
opts.load(config_filename)

state = shared_state.State()

hypernetworks: dict = {}
loaded_hypernetworks: list = []
demo = None  # the gradio Blocks, once built
device = None  # set by modules.devices
weight_load_location = None if cmd_opts.lowram else "cpu"
sd_upscalers: list = upscaler.builtin_upscalers()  # image upscalers for the hires fix and img2img
latent_upscale_modes = upscaler.latent_upscale_modes
latent_upscale_default_mode = upscaler.latent_upscale_default_mode


def reload_hypernetworks() -> None:
    from modules.hypernetworks import hypernetwork
    hypernetwork.refresh_hypernetworks()  # fills shared.hypernetworks in place


def list_checkpoint_tiles(use_short: bool = False) -> list:
    from modules import sd_models
    return list(sd_models.checkpoint_tiles(use_short))


def refresh_checkpoints() -> None:
    from modules import sd_models
    sd_models.list_models()


class _Shared(types.ModuleType):
    """Makes `shared.sd_model` a property, as in A1111: reading it loads the model on first use."""

    @property
    def sd_model(self):
        from modules import sd_models
        return sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        from modules import sd_models
        sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = _Shared
