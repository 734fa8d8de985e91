"""HTTP routes of the extension (A1111 paths and shapes): GET /sdapi/v1/loras, POST /sdapi/v1/refresh-loras.

Unlike A1111 they honour --api-auth, and `ssmd_cover_images` (base64 images) is left out of the metadata.
"""
from __future__ import annotations

import secrets

import extra_networks_lora
import lora_block_weights
import lora_discovery
from fastapi import Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from modules import shared

LARGE_METADATA_KEYS = ("ssmd_cover_images",)


def network_info(entry) -> dict:
    metadata = {k: v for k, v in (entry.metadata or {}).items() if k not in LARGE_METADATA_KEYS}
    return {"name": entry.name, "alias": entry.alias, "path": entry.filename, "metadata": metadata}


def list_loras() -> list[dict]:
    return [network_info(entry) for entry in list(lora_discovery.available_networks.values())]


def block_weights_info() -> dict:
    """The tag editor's data: block ids of the loaded model's family, vector forms, presets (LBW's and the user's)."""
    sd_model = getattr(shared, "sd_model", None)
    family = extra_networks_lora.model_family(sd_model)
    return lora_block_weights.editor_info(family, getattr(shared, "data_path", None),
                                          extra_networks_lora.block_layer_names(sd_model, family))


def refresh_loras() -> None:
    lora_discovery.list_available_networks()
    return None


def _credentials() -> dict[str, str]:
    res = {}
    for pair in (getattr(shared.cmd_opts, "api_auth", None) or "").split(","):
        user, sep, password = pair.strip().partition(":")
        if sep:
            res[user] = password
    return res


def _auth_dependencies() -> list:
    credentials = _credentials()
    if not credentials:
        return []
    def auth(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:  # noqa: B008
        password = credentials.get(given.username)
        if password is not None and secrets.compare_digest(given.password.encode(), password.encode()):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return [Depends(auth)]


def add_routes(demo, app) -> None:
    """on_app_started callback."""
    dependencies = _auth_dependencies()
    app.add_api_route("/sdapi/v1/loras", list_loras, methods=["GET"], dependencies=dependencies)
    app.add_api_route("/sdapi/v1/refresh-loras", refresh_loras, methods=["POST"], dependencies=dependencies)
    # the page's tag editor reads this; like the page's other routes it sits behind the UI login, not --api-auth
    app.add_api_route("/lora/block-weights", block_weights_info, methods=["GET"])
