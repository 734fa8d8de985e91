"""Requirements check for the Lora extension: it needs only torch and safetensors, which the host installs."""


def check_requirements() -> bool:
    try:
        import safetensors  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        print(f"*** Lora extension: missing package ({e}); run the host's set-up")
        return False
    return True


if __name__ == "__main__":
    check_requirements()
