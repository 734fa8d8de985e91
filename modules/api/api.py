"""The HTTP API (A1111 paths and shapes). With --api-auth every route added through Api needs HTTP basic auth."""
from __future__ import annotations

import base64
import inspect
import io
import secrets
import threading
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from modules import (
    errors,
    http_credentials,
    images,
    processing,
    progress,
    samplers,
    script_callbacks,
    sd_modules,
    shared,
    txt2img,
    upscaler,
)
from modules.api import models

SECRET_FLAGS = ("api_auth", "gradio_auth")  # never shown by /sdapi/v1/cmd-flags


def _check_option(key: str, value: Any) -> None:
    """422 naming the option when its own check refuses the value (samples_format: image formats only)."""
    try:
        shared.opts.check(key, value)
    except ValueError as e:
        raise HTTPException(status_code=422, detail=f"{key}: {e}") from e


def encode_pil_to_base64(image) -> str:
    """PNG bytes in base64, with the infotext in the `parameters` chunk as A1111 writes it."""
    from PIL import PngImagePlugin

    buf = io.BytesIO()
    pnginfo = PngImagePlugin.PngInfo()
    parameters = image.info.get("parameters")
    if parameters and shared.opts.enable_pnginfo:
        pnginfo.add_text("parameters", parameters)
    image.save(buf, format="PNG", pnginfo=pnginfo)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def parse_credentials(value: str | None) -> dict[str, str]:
    """`user:pass,user2:pass2` → {user: pass}; a password may itself contain ':'."""
    result = {}
    for pair in (value or "").split(","):
        pair = pair.strip()
        if ":" in pair:
            user, password = pair.split(":", 1)
            result[user] = password
    return result


def _processing_parameters(cls=processing.StableDiffusionProcessingTxt2Img) -> set[str]:
    names = set()
    for klass in (cls, processing.StableDiffusionProcessing):
        names.update(p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "kwargs"))
    return names


def _checkpoint_failed(e: Exception) -> JSONResponse:
    """A checkpoint that did not load: 422 for a bad file, else 500; the detail names the file, the reason and the
    model that stays loaded."""
    errors.display(e, "API: switching checkpoint")
    return JSONResponse(status_code=422 if getattr(e, "bad_file", False) else 500,
                        content={"error": type(e).__name__, "detail": str(e)})


def _checkpoint_exists(title: str) -> bool:
    from modules import sd_models
    match = getattr(sd_models, "get_closet_checkpoint_match", None)
    if match is not None:
        return match(title) is not None
    return any(title in (info.title, getattr(info, "name", None), getattr(info, "model_name", None))
               for info in sd_models.checkpoints_list.values())


class Api:
    def __init__(self, app: FastAPI, queue_lock: threading.Lock):
        self.app = app
        self.queue_lock = queue_lock
        self.credentials = http_credentials.api_credentials(shared.cmd_opts)  # strict: a typo must not open it
        if shared.cmd_opts.nowebui:
            script_callbacks.ui_settings_callback()  # with the UI, create_ui() does this

        self.add_api_route("/sdapi/v1/txt2img", self.text2imgapi, methods=["POST"],
                           response_model=models.TextToImageResponse)
        self.add_api_route("/sdapi/v1/img2img", self.img2imgapi, methods=["POST"],
                           response_model=models.ImageToImageResponse)
        self.add_api_route("/sdapi/v1/upscalers", self.get_upscalers, methods=["GET"],
                           response_model=list[models.UpscalerItem])
        self.add_api_route("/sdapi/v1/latent-upscale-modes", self.get_latent_upscale_modes, methods=["GET"],
                           response_model=list[models.LatentUpscalerModeItem])
        self.add_api_route("/sdapi/v1/progress", self.progressapi, methods=["GET"],
                           response_model=models.ProgressResponse)
        self.add_api_route("/sdapi/v1/interrupt", self.interruptapi, methods=["POST"])
        self.add_api_route("/sdapi/v1/skip", self.skip, methods=["POST"])
        self.add_api_route("/sdapi/v1/options", self.get_config, methods=["GET"])
        self.add_api_route("/sdapi/v1/options", self.set_config, methods=["POST"])
        self.add_api_route("/sdapi/v1/cmd-flags", self.get_cmd_flags, methods=["GET"])
        self.add_api_route("/sdapi/v1/samplers", self.get_samplers, methods=["GET"],
                           response_model=list[models.SamplerItem])
        self.add_api_route("/sdapi/v1/sd-models", self.get_sd_models, methods=["GET"],
                           response_model=list[models.SDModelItem])
        self.add_api_route("/sdapi/v1/sd-modules", self.get_sd_modules, methods=["GET"],
                           response_model=list[models.SDModuleItem])
        self.add_api_route("/sdapi/v1/refresh-checkpoints", self.refresh_checkpoints, methods=["POST"])
        self.add_api_route("/sdapi/v1/hypernetworks", self.get_hypernetworks, methods=["GET"],
                           response_model=list[models.HypernetworkItem])
        self.add_api_route("/sdapi/v1/create/hypernetwork", self.create_hypernetwork, methods=["POST"],
                           response_model=models.CreateResponse)
        self.add_api_route("/sdapi/v1/train/hypernetwork", self.train_hypernetwork, methods=["POST"],
                           response_model=models.TrainResponse)

    def auth(self, credentials: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:
        password = self.credentials.get(credentials.username)
        if password is not None and secrets.compare_digest(credentials.password.encode(), password.encode()):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    def add_api_route(self, path: str, endpoint, **kwargs) -> None:
        """A1111 API for extensions too: adds the auth dependency when --api-auth is set."""
        if self.credentials:
            kwargs["dependencies"] = [*kwargs.get("dependencies", []), Depends(self.auth)]
        self.app.add_api_route(path, endpoint, **kwargs)

    # --- generation ----------------------------------------------------------------------------------------------
    def _processing(self, req: models.GenerationRequest, cls, **fields):
        """The processing object for a request: 404 for an unknown sampler or checkpoint, 422 for a bad option."""
        sampler = req.sampler_name or req.sampler_index  # none: the model's default (checked by the job)
        if sampler and sampler not in samplers.all_samplers:
            raise HTTPException(status_code=404, detail=f"Sampler not found: {sampler}")
        override = dict(req.override_settings or {})
        for key, value in override.items():
            _check_option(key, value)
        checkpoint = override.get("sd_model_checkpoint")
        if checkpoint is not None and not _checkpoint_exists(checkpoint):
            raise HTTPException(status_code=404, detail=f"model {checkpoint!r} not found")

        request = req.model_dump()
        allowed = _processing_parameters(cls)
        args = {k: v for k, v in request.items() if k in allowed and k not in ("sampler_index", "override_settings")}
        args.update(fields)
        args["sampler_name"] = sampler
        args["override_settings"] = override
        args["do_not_save_samples"] = not req.save_images or req.do_not_save_samples
        args["do_not_save_grid"] = True
        return cls(**args)

    @staticmethod
    def _run(p, what: str):
        """Runs the job; JobInputError (a parameter it cannot run) is a 422 naming the parameter."""
        try:
            return txt2img.run(p)
        except errors.JobInputError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        except Exception as e:
            errors.display(e, f"API {what}")
            return JSONResponse(status_code=500, content={"error": type(e).__name__, "detail": str(e)})

    def text2imgapi(self, txt2imgreq: models.StableDiffusionTxt2ImgProcessingAPI):
        p = self._processing(txt2imgreq, processing.StableDiffusionProcessingTxt2Img)
        processed = self._run(p, "txt2img")
        if isinstance(processed, JSONResponse):
            return processed
        result = [encode_pil_to_base64(image) for image in processed.images] if txt2imgreq.send_images else []
        return models.TextToImageResponse(images=result, parameters=txt2imgreq.model_dump(), info=processed.js())

    def img2imgapi(self, img2imgreq: models.StableDiffusionImg2ImgProcessingAPI):
        if img2imgreq.init_images is None:
            raise HTTPException(status_code=404, detail="Init image not found")
        if img2imgreq.mask:
            raise HTTPException(status_code=422, detail="mask: inpainting is not supported by this host; send "
                                                        "img2img without a mask")
        try:
            init_images = [images.decode_base64_to_image(x, f"init_images[{i}]")
                           for i, x in enumerate(img2imgreq.init_images)]
        except images.ImageDecodeError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        p = self._processing(img2imgreq, processing.StableDiffusionProcessingImg2Img, init_images=init_images,
                             mask=None)
        processed = self._run(p, "img2img")
        if isinstance(processed, JSONResponse):
            return processed
        result = [encode_pil_to_base64(image) for image in processed.images] if img2imgreq.send_images else []
        parameters = img2imgreq.model_dump()
        if not img2imgreq.include_init_images:
            parameters["init_images"] = None
            parameters["mask"] = None
        return models.ImageToImageResponse(images=result, parameters=parameters, info=processed.js())

    def get_upscalers(self):
        return [models.UpscalerItem(name=u.name, model_name=u.model_name, model_path=u.model_path,
                                    model_url=u.model_url, scale=u.scale) for u in shared.sd_upscalers]

    def get_latent_upscale_modes(self):
        return [models.LatentUpscalerModeItem(name=name) for name in upscaler.latent_upscale_modes]

    def progressapi(self, skip_current_image: bool = False):
        return models.ProgressResponse(**progress.progress_snapshot())

    def interruptapi(self):
        shared.state.interrupt()
        return {}

    def skip(self):
        shared.state.skip()
        return {}

    # --- settings and models -------------------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {key: shared.opts.data.get(key, info.default)
                for key, info in shared.opts.data_labels.items() if not info.do_not_save}

    def set_config(self, req: dict[str, Any]):
        checkpoint = req.get("sd_model_checkpoint")
        if checkpoint is not None and not _checkpoint_exists(checkpoint):
            raise HTTPException(status_code=404, detail=f"model {checkpoint!r} not found")
        for key, value in req.items():
            info = shared.opts.data_labels.get(key)
            if info is None:
                print(f"API: ignoring unknown option {key!r}")
                continue
            if not shared.opts.same_type(value, info.default):
                raise HTTPException(status_code=422, detail=f"{key}: expected {type(info.default).__name__}, "
                                                            f"got {type(value).__name__}")
            _check_option(key, value)
        # the checkpoint first: it is the one that can fail, and then no other option is changed either; text
        # encoder / VAE files sent with it are what it loads with (and are put back when it fails)
        loads = ("sd_model_checkpoint", sd_modules.OPTION)
        modules_before = shared.opts.data.get(sd_modules.OPTION)
        if checkpoint is not None and sd_modules.OPTION in req:
            shared.opts.set(sd_modules.OPTION, req[sd_modules.OPTION], is_api=True, run_callbacks=False)
        for key in sorted(req, key=lambda k: loads.index(k) if k in loads else len(loads)):
            if key in shared.opts.data_labels:
                try:
                    # the onchange callbacks (set by webui.initialize) reload the model under the queue lock
                    shared.opts.set(key, req[key], is_api=True)
                except Exception as e:
                    if key not in loads:
                        raise
                    shared.opts.data[sd_modules.OPTION] = modules_before
                    return _checkpoint_failed(e)
        shared.opts.save(shared.config_filename)
        return None

    def get_cmd_flags(self) -> dict[str, Any]:
        return {k: v for k, v in vars(shared.cmd_opts).items() if k not in SECRET_FLAGS}

    def get_samplers(self):
        """The loaded model's samplers (every one while no model is loaded; this never loads one)."""
        from modules import sd_models
        names = samplers.samplers_for(sd_models.model_data.sd_model)
        return [models.SamplerItem(name=name, aliases=[], options={}) for name in names]

    def get_sd_modules(self):
        """Forge's route: the text encoder and VAE files `forge_additional_modules` can name."""
        return [models.SDModuleItem(model_name=name, filename=path) for name, path in sd_modules.list_modules().items()]

    def get_sd_models(self):
        from modules import sd_models
        result = []
        for info in sd_models.checkpoints_list.values():
            result.append(models.SDModelItem(
                title=info.title,
                model_name=getattr(info, "model_name", None) or getattr(info, "name", ""),
                hash=getattr(info, "shorthash", None) or getattr(info, "hash", None),
                sha256=getattr(info, "sha256", None),
                filename=info.filename,
                config=getattr(info, "config", None)))
        return result

    def refresh_checkpoints(self):
        with self.queue_lock:
            shared.refresh_checkpoints()
        return None

    # --- hypernetworks -------------------------------------------------------------------------------------------
    def get_hypernetworks(self):
        from modules.hypernetworks import hypernetwork
        found = hypernetwork.refresh_hypernetworks()  # a cheap glob: files dropped in show up without a restart
        return [models.HypernetworkItem(name=name, path=path) for name, path in found.items()]

    def create_hypernetwork(self, req: models.CreateHypernetworkRequest):
        from modules.hypernetworks import hypernetwork
        try:
            filename = hypernetwork.create_hypernetwork(**req.model_dump())
        except FileExistsError as e:
            raise HTTPException(status_code=409, detail=f"create hypernetwork error: {e}") from None
        except ValueError as e:
            raise HTTPException(status_code=422, detail=f"create hypernetwork error: {e}") from None
        return models.CreateResponse(info=f"create hypernetwork filename: {filename}")

    def train_hypernetwork(self, req: models.TrainHypernetworkRequest):
        """Trains under the queue lock, as A1111 does: the request returns when training ends (or is interrupted
        through /sdapi/v1/interrupt); /sdapi/v1/progress follows it meanwhile."""
        from modules.hypernetworks import hypernetwork, training

        args = req.training_kwargs()
        with self.queue_lock:
            if args["hypernetwork_name"] not in hypernetwork.refresh_hypernetworks():
                raise HTTPException(status_code=404, detail=f"Hypernetwork not found: {args['hypernetwork_name']}")
            try:
                trained, filename = training.train_hypernetwork(**args)
            except (ValueError, FileNotFoundError) as e:
                raise HTTPException(status_code=422, detail=f"train hypernetwork error: {e}") from None
            except Exception as e:
                errors.display(e, "API train hypernetwork")
                return JSONResponse(status_code=500, content={"error": type(e).__name__, "detail": str(e)})
        info = shared.state.textinfo or f"Training finished at step {trained.step}; saved {filename}"
        return models.TrainResponse(info=info, filename=filename, step=trained.step)

