"""The Lora extension's webui script (A1111 file name). Imported with the extension folder on sys.path."""
import extra_networks_lora
import lora  # noqa: F401  (A1111's old names, imported by other extensions)
import lora_api
import lora_infotext
import lora_patches
import lora_settings
import networks
import ui_extra_networks_lora

from modules import errors, extra_networks, script_callbacks, ui_extra_networks

lora_settings.register()  # so the options exist without a UI; on_ui_settings adds the components

networks.originals = lora_patches.LoraPatches()  # A1111 attribute: the torch forwards as they were (no patching)
networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()
extra_networks.register_extra_network(networks.extra_network_lora)
extra_networks.register_extra_network_alias(networks.extra_network_lora, "lyco")

try:
    networks.list_available_networks()
except Exception as e:  # a broken folder must not stop the host
    errors.display(e, "listing Lora networks")


def before_ui() -> None:
    # extra_networks.initialize() may have run again since import: registering twice is harmless
    extra_networks.register_extra_network(networks.extra_network_lora)
    extra_networks.register_extra_network_alias(networks.extra_network_lora, "lyco")
    try:
        ui_extra_networks.register_page(ui_extra_networks_lora.ExtraNetworksPageLora())
    except Exception as e:  # the web UI must come up without the card page rather than not at all
        errors.display(e, "creating the Lora card page")


script_callbacks.on_model_loaded(networks.assign_network_names_to_compvis_modules)
script_callbacks.on_before_ui(before_ui)
script_callbacks.on_ui_settings(lambda: lora_settings.register(with_components=True))
script_callbacks.on_infotext_pasted(lora_infotext.infotext_pasted)
script_callbacks.on_infotext_pasted(lora_infotext.addnet_infotext_pasted)
script_callbacks.on_app_started(lora_api.add_routes)
