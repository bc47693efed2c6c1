import subprocess
import sys

import pytest

from kandinsky3 import read_metadata
from kandinsky3.cli import main


def test_generate_writes_png_with_metadata(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert (
        main(
            [
                "generate",
                "a red circle",
                "--model",
                "tiny",
                "--seed",
                "0",
                "--steps",
                "3",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    meta = read_metadata(out)
    assert meta["prompt"] == "a red circle" and meta["seed"] == 0 and meta["steps"] == 3


def test_several_images_get_numbered(tmp_path):
    assert (
        main(
            [
                "generate",
                "a star",
                "--model",
                "tiny",
                "--num-images",
                "2",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "s.png"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "s-0.png").is_file() and (tmp_path / "s-1.png").is_file()


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["generate", "x", "--model", "tiny", "--width", "100", "--out", str(tmp_path / "x.png")]) == 2
    assert "multiple of 64" in capsys.readouterr().err
    assert main(["generate", "x", "--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_convert_and_info(tmp_path, capsys, tiny):
    tiny.save_pretrained(tmp_path / "official", layout="official")
    assert main(["convert", str(tmp_path / "official"), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert main(["info", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "diffusers layout" in out and "748 tensors" in out and "variant:     tiny" in out  # kept by the side file


def test_upscale_writes_a_4x_png_with_its_settings(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 12), (200, 40, 40)).save(tmp_path / "small.png")
    out = tmp_path / "big.png"
    assert (
        main(
            [
                "upscale",
                str(tmp_path / "small.png"),
                "--model",
                "tiny",
                "--steps",
                "2",
                "--window",
                "32",
                "--stride",
                "24",
                "--blend",
                "uniform",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    meta = read_metadata(out)
    assert Image.open(out).size == (80, 48) and meta["blend"] == "uniform" and meta["window"] == 32


@pytest.mark.parametrize("command", ["generate", "edit", "inpaint", "outpaint", "convert", "info", "upscale"])
def test_help_has_examples(command):
    result = subprocess.run([sys.executable, "-m", "kandinsky3.cli", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "examples:" in result.stdout


def test_image_commands_do_not_need_the_training_extras():
    """`pip install -e .` (no [train]/[eval] extras) must run `generate`: the parser and the image path import
    nothing of training/eval (accelerate, scipy, pyyaml)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import kandinsky3.cli as cli\n"
        "cli.build_parser().parse_args(['generate', 'x'])\n"
        "import kandinsky3.pipeline, kandinsky3.tasks\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('accelerate', 'scipy', 'yaml')\n"
        "         or m.startswith(('kandinsky3.training', 'kandinsky3.eval', 'kandinsky3.world'))]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_recipe_is_one_line(capsys):
    assert main(["train", "gan", "--config", "configs/toy_gan.yaml"]) == 2
    assert "unknown recipe 'gan'" in capsys.readouterr().err


def test_no_progress_silences_the_upscaler_too(tmp_path, capsys):
    argv = ["generate", "a red circle", "--model", "tiny", "--steps", "2", "--upscale", "2", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "big.png")]) == 0
    err = capsys.readouterr().err  # (library deprecation warnings may show under pytest; no bar may)
    assert "%|" not in err and "\r" not in err and "denoising" not in err
    assert read_metadata(tmp_path / "big.png")["upscale"] == 2


def test_a_run_that_overflows_is_an_error_not_a_black_picture(tmp_path, capsys):
    out = tmp_path / "g.png"
    argv = ["generate", "a blue square", "--model", "tiny", "--steps", "2", "--guidance", "1e300", "--no-progress"]
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "NaN or inf" in err and "--guidance" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_version_and_home_relative_outputs(tmp_path, monkeypatch, capsys):
    from kandinsky3 import __version__
    from kandinsky3.cli import output_paths

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"kandinsky3 {__version__}"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert output_paths("~/x.png", 1, False) == [tmp_path / "x.png"]


def test_an_unknown_option_shows_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["outpaint", "photo.png", "a beach", "--width", "128"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("usage: kandinsky3 outpaint") and "--left" in err
    assert err.strip().splitlines()[-1] == "kandinsky3 outpaint: error: unrecognized arguments: --width 128"


def test_convert_takes_a_packaged_model_by_name(tmp_path, capsys):
    assert main(["convert", "nano-flash", str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert main(["info", str(tmp_path / "d")]) == 0
    assert "nano-flash" in capsys.readouterr().out
