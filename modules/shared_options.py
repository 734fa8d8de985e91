"""The host's own options (A1111 keys and defaults). Extensions add theirs through on_ui_settings."""
from modules import sd_modules
from modules.options import OptionInfo, options_section
from modules.served_files import IMAGE_EXTENSIONS, check_image_format

options_templates: dict = {}

options_templates.update(options_section(("saving-images", "Saving images"), {
    "samples_format": OptionInfo("png", "File format for images", validate=check_image_format
                                 ).info(", ".join(IMAGE_EXTENSIONS)),
    "samples_save": OptionInfo(True, "Always save all generated images"),
    "outdir_txt2img_samples": OptionInfo("", "Output folder for txt2img images (empty: outputs/txt2img-images)"),
    "outdir_img2img_samples": OptionInfo("", "Output folder for img2img images (empty: outputs/img2img-images)"),
    "enable_pnginfo": OptionInfo(True, "Save text information about generation parameters as chunks to png files"),
}))

options_templates.update(options_section(("sd", "Stable Diffusion"), {
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
    sd_modules.OPTION: OptionInfo([], sd_modules.LABEL, validate=sd_modules.validate
                                  ).info("text encoder and VAE files for Flux checkpoints that do not bundle them"),
    "sd_checkpoint_cache": OptionInfo(0, "Checkpoints to cache in RAM"),
    "sd_hypernetwork": OptionInfo("None", "Add hypernetwork to prompt"),
    "add_model_hash_to_info": OptionInfo(True, "Add model hash to generation information"),
    "add_model_name_to_info": OptionInfo(True, "Add model name to generation information"),
    "add_version_to_infotext": OptionInfo(True, "Add program version to generation information"),
    "disable_mmap_load_safetensors": OptionInfo(False, "Disable memmapping for loading .safetensors files."),
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip", component_args={"minimum": 1, "maximum": 12, "step": 1}
                                           ).info("1 = the last layer; SD1/SD2 only (SDXL always uses the "
                                                  "penultimate layer)"),
}))

options_templates.update(options_section(("extra_networks", "Extra Networks"), {
    "extra_networks_show_hidden_directories": OptionInfo(True, "Show hidden directories"),
    "extra_networks_dir_button_function": OptionInfo(False, "Add a '/' to the beginning of directory buttons"),
    "extra_networks_hidden_models": OptionInfo("When searched", "Show cards for models in hidden directories",
                                               component_args={"choices": ["Always", "When searched", "Never"]}),
    "extra_networks_default_multiplier": OptionInfo(1.0, "Default multiplier for extra networks",
                                                    component_args={"minimum": 0.0, "maximum": 2.0, "step": 0.01}),
    "extra_networks_card_width": OptionInfo(0, "Card width for Extra Networks"),
    "extra_networks_card_height": OptionInfo(0, "Card height for Extra Networks"),
    "extra_networks_card_text_scale": OptionInfo(1.0, "Card text scale"),
    "extra_networks_card_show_desc": OptionInfo(True, "Show description on card"),
    "extra_networks_card_description_is_html": OptionInfo(False, "Treat card description as HTML"),
    "extra_networks_card_order_field": OptionInfo("Path", "Default order field for Extra Networks cards",
                                                  component_args={"choices": ["Path", "Name", "Date Created",
                                                                              "Date Modified"]}),
    "extra_networks_card_order": OptionInfo("Ascending", "Default order for Extra Networks cards",
                                            component_args={"choices": ["Ascending", "Descending"]}),
    "extra_networks_tree_view_style": OptionInfo("Dirs", "Extra Networks directory view style",
                                                 component_args={"choices": ["Tree", "Dirs"]}),
    "extra_networks_tree_view_default_enabled": OptionInfo(True, "Show the Extra Networks directory view by default"),
    "extra_networks_tree_view_default_width": OptionInfo(180, "Default width for the directory tree view"),
    "extra_networks_add_text_separator": OptionInfo(" ", "Extra networks separator"),
    "ui_extra_networks_tab_reorder": OptionInfo("", "Extra networks tab order"),
    "textual_inversion_add_hashes_to_infotext": OptionInfo(True, "Add Textual Inversion hashes to infotext"),
    "list_hidden_files": OptionInfo(True, "Load models/files in hidden directories"),
    "keyedit_precision_extra": OptionInfo(0.05, "Ctrl+up/down precision when editing <extra networks:0.9>"),
}))
