"""The Lora extension's webui script (A1111 file name). Imported with the extension folder on sys.path."""
import extra_networks_lora
import lora_api
import lora_infotext
import lora_settings
import networks

from modules import errors, extra_networks, script_callbacks, ui_extra_networks

lora_settings.register()  # so the options exist without a UI; on_ui_settings adds the components

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
        import ui_extra_networks_lora
    except ImportError as e:
        errors.display(e, "loading the Lora card page")
        return
    ui_extra_networks.register_page(ui_extra_networks_lora.ExtraNetworksPageLora())


script_callbacks.on_model_loaded(networks.assign_network_names_to_compvis_modules)
script_callbacks.on_before_ui(before_ui)
script_callbacks.on_ui_settings(lambda: lora_settings.register(with_components=True))
script_callbacks.on_infotext_pasted(lora_infotext.infotext_pasted)
script_callbacks.on_infotext_pasted(lora_infotext.addnet_infotext_pasted)
script_callbacks.on_app_started(lora_api.add_routes)
