"""The Hires. fix accordion and the img2img tab in headless Chromium: a job with a Lora tag in the Hires prompt, one
img2img job from an uploaded image, and pasting a hires infotext back into the fields."""
import numpy as np
import pytest
from PIL import Image

LORA = "demo_sd1_style"


@pytest.fixture(scope="module")
def page(cards_page):
    return cards_page


def _number(page, elem_id: str, value) -> None:
    page.locator(f"#{elem_id} input[type=number]").fill(str(value))


def _gallery_image_size(page, tabname: str) -> tuple[int, int]:
    image = page.locator(f"#{tabname}_gallery img").first
    image.wait_for(timeout=120000)
    page.wait_for_function(f"() => document.querySelector('#{tabname}_gallery img')?.naturalWidth > 0",
                           timeout=30000)
    return tuple(image.evaluate("img => [img.naturalWidth, img.naturalHeight]"))


def test_hires_fix_with_a_lora_in_the_hires_prompt_and_paste(page):
    page.locator("#txt2img_prompt textarea").fill("a house")
    for elem_id, value in (("txt2img_steps", 2), ("txt2img_width", 64), ("txt2img_height", 64),
                           ("txt2img_seed", 5)):
        _number(page, elem_id, value)
    page.locator("#txt2img_hr").get_by_text("Hires. fix").first.click()
    page.locator("#txt2img_enable_hr input[type=checkbox]").check()
    _number(page, "txt2img_hires_steps", 1)
    page.locator("#txt2img_hr_prompt textarea").fill(f"a house <lora:{LORA}:1>")
    page.locator("#txt2img_generate").click()
    page.wait_for_function("() => document.querySelector('#html_info_txt2img')?.innerText.includes('Hires upscale')",
                           timeout=120000)
    info = page.locator("#html_info_txt2img").inner_text()
    assert "Denoising strength: 0.7" in info and "Hires steps: 1" in info and "Hires upscaler: Latent" in info
    assert f'Hires prompt: "a house <lora:{LORA}:1>"' in info and f'Lora hashes: "{LORA}: ' in info
    assert _gallery_image_size(page, "txt2img") == (128, 128)

    # the infotext, as made where the file is called "renamed", pasted back: the hires fix is turned on and the
    # Hires prompt's tag re-pointed to the local file by its hash in `Lora hashes`
    infotext = page.locator("#html_info_txt2img .infotext").inner_text().strip().replace(LORA, "renamed")
    page.locator("#txt2img_enable_hr input[type=checkbox]").uncheck()
    page.locator("#txt2img_hr_prompt textarea").fill("")
    page.locator("#txt2img_prompt textarea").fill(infotext)
    page.locator("#txt2img_paste").click()
    page.wait_for_function("() => document.querySelector('#txt2img_hr_prompt textarea').value.includes('<lora:')",
                           timeout=30000)
    assert page.locator("#txt2img_hr_prompt textarea").input_value() == f"a house <lora:{LORA}:1>"
    assert page.locator("#txt2img_enable_hr input[type=checkbox]").is_checked()
    assert page.locator("#txt2img_prompt textarea").input_value() == "a house"
    page.locator("#txt2img_enable_hr input[type=checkbox]").uncheck()  # later tests in this page run plain jobs
    assert not page.page_errors, page.page_errors


def test_img2img_tab_with_a_lora_tag(page, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    page.locator("#tab_img2img-button").click()
    try:
        page.locator("#img2img_image input[type=file]").set_input_files(str(init))
        page.locator("#img2img_image img").first.wait_for(timeout=30000)
        page.locator("#img2img_prompt textarea").fill(f"a boat <lora:{LORA}:0.8>")
        for elem_id, value in (("img2img_steps", 2), ("img2img_width", 64), ("img2img_height", 64),
                               ("img2img_seed", 9)):
            _number(page, elem_id, value)
        page.locator("#img2img_generate").click()
        page.wait_for_function(
            "() => document.querySelector('#html_info_img2img')?.innerText.includes('Denoising strength')",
            timeout=120000)
        info = page.locator("#html_info_img2img").inner_text()
        assert info.startswith(f"a boat <lora:{LORA}:0.8>")
        assert "Denoising strength: 0.75" in info and f'Lora hashes: "{LORA}: ' in info
        assert _gallery_image_size(page, "img2img") == (64, 64)
        assert not page.page_errors, page.page_errors
    finally:
        page.locator("#tab_txt2img-button").click()
