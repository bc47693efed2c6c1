"""Bad inputs and faults at the command line (#20): each is refused with exit status 2 and one line on stderr that
names the problem, with no traceback, and nothing is written or changed (the outputs folder, the inputs, the
package). The commands run in-process through ``cli.main``; the few that need a model get the session ``tiny``.

Every row is (id, command line, the words the message must contain). ``{in}`` is a folder of prepared bad and good
inputs, ``{out}`` an empty folder per case (the working directory)."""

from __future__ import annotations

import builtins
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kandinsky3
from kandinsky3 import cli
from kandinsky3.images import as_pil, read_metadata

PACKAGE = Path(kandinsky3.__file__).parent
REPO = Path(__file__).parent.parent
HUGE = "100032"
TOY = "{repo}/configs/toy_gan.yaml"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(d / "ok.png")
    Image.new("L", (32, 32), 255).save(d / "mask32.png")
    Image.new("L", (64, 64), 255).save(d / "mask.png")
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("not an image at all\n")
    data = (d / "ok.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "folder.png").mkdir()
    (d / "emptymodel").mkdir()
    (d / "afile.txt").write_text("x")
    (d / "prompts.txt").write_text("a red circle\na blue star\n")
    (d / "blank.txt").write_text("\n   \n# only a comment\n")
    (d / "bad.yaml").write_text("recipe: toy_gan\nsteps: [1, 2\n")
    (d / "unknown_key.yaml").write_text((REPO / "configs" / "toy_gan.yaml").read_text() + "\nno_such_key: 1\n")
    tiny.save_pretrained(d / "tinymodel", layout="native")
    for name, part, tensor, value in (
        ("nanmodel", "unet.safetensors", None, float("nan")),
        ("infmodel", "movq.safetensors", None, float("inf")),
    ):
        _copy_tree(d / "tinymodel", d / name)
        from safetensors.torch import load_file, save_file

        sd = load_file(str(d / name / part))
        key = sorted(k for k, v in sd.items() if v.is_floating_point())[0]
        sd[key] = sd[key].clone()
        sd[key].view(-1)[0] = value
        save_file(sd, str(d / name / part))
        (d / name / "poisoned.txt").write_text(key)
    _copy_tree(d / "tinymodel", d / "corruptmodel")
    (d / "corruptmodel" / "unet.safetensors").write_bytes(b"\x00" * 64)
    return d


def _copy_tree(src: Path, dst: Path):
    import shutil

    shutil.copytree(src, dst)


def _snapshot(*roots: Path) -> dict:
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if "__pycache__" in path.parts:
                continue
            st = path.lstat()
            out[str(path)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


# (id, argv, words the one-line message must contain). Generate/edit/… use --model tiny (patched to the session
# model where it would load) so checks that need the model run in milliseconds.
CASES = [
    # -- generate: request values (refused before the model loads) ------------------------------------------
    ("steps-0", ["generate", "x", "--steps", "0"], ["steps", "positive"]),
    ("steps-negative", ["generate", "x", "--steps", "-3"], ["steps"]),
    ("guidance-nan", ["generate", "x", "--guidance", "nan"], ["guidance", "finite"]),
    ("guidance-inf", ["generate", "x", "--guidance", "inf"], ["guidance", "finite"]),
    ("guidance-negative", ["generate", "x", "--guidance", "-1"], ["guidance", "≥ 0"]),
    ("eta-negative", ["generate", "x", "--eta", "-0.5"], ["eta"]),
    ("eta-nan", ["generate", "x", "--eta", "nan"], ["eta", "finite"]),
    ("threshold-0", ["generate", "x", "--threshold-percentile", "0"], ["threshold_percentile"]),
    ("threshold-over-1", ["generate", "x", "--threshold-percentile", "1.5"], ["threshold_percentile"]),
    ("width-0", ["generate", "x", "--width", "0"], ["width", "positive"]),
    ("width-negative", ["generate", "x", "--width", "-64"], ["width"]),
    ("width-not-multiple", ["generate", "x", "--model", "tiny", "--width", "100"], ["width 100", "multiple of 64"]),
    ("height-not-multiple-nano", ["generate", "x", "--height", "33"], ["height 33", "multiple of 32"]),
    ("size-huge", ["generate", "x", "--width", HUGE, "--height", HUGE], ["GiB", "--force"]),
    ("size-huge-tiny", ["generate", "x", "--model", "tiny", "--width", HUGE, "--height", HUGE], ["GiB"]),
    ("many-images", ["generate", "x", "--model", "tiny", "--num-images", "10000000"], ["GiB", "fewer --num-images"]),
    ("num-images-0", ["generate", "x", "--num-images", "0"], ["num_images"]),
    ("seed-negative", ["generate", "x", "--seed", "-1"], ["seed"]),
    ("seed-too-big", ["generate", "x", "--seed", str(2**64)], ["seed"]),
    (
        "seeds-vs-images",
        ["generate", "x", "--model", "tiny", "--seed", "1", "2", "3"],
        ["3 seeds for 1 image:", "--num-images"],
    ),
    # -- outputs (refused before the model loads; nothing replaced) ---------------------------------------------
    ("out-gif", ["generate", "x", "--out", "{out}/x.gif"], ["unknown image extension", ".gif"]),
    ("out-no-extension", ["generate", "x", "--out", "{out}/x"], ["unknown image extension"]),
    ("out-missing-folder", ["generate", "x", "--out", "{out}/nope/x.png"], ["does not exist"]),
    ("out-parent-is-file", ["generate", "x", "--out", "{in}/afile.txt/x.png"], ["is not a folder"]),
    ("out-is-folder", ["generate", "x", "--out", "{in}/folder.png"], ["is a folder"]),
    ("out-is-folder-no-extension", ["generate", "x", "--out", "{in}/emptymodel"], ["is a folder", "image.png"]),
    ("edges-out-missing-folder", ["edges", "{in}/ok.png", "{out}/nope/e.png"], ["OUT", "does not exist"]),
    ("out-exists", ["generate", "x", "--out", "{in}/ok.png"], ["exists", "--overwrite"]),
    ("out-numbered-exists", ["generate", "x", "--num-images", "2", "--out", "{out}/taken.png"], ["taken-1.png"]),
    ("out-read-only", ["generate", "x", "--out", "{out}/ro.png", "--overwrite"], ["read-only"]),
    ("out-folder-not-writable", ["generate", "x", "--out", "{out}/x.png"], ["not writable"]),
    # -- devices and models -------------------------------------------------------------------------------------
    ("device-no-cuda", ["generate", "x", "--device", "cuda:99"], ["--device cuda:99"]),
    ("device-unknown", ["generate", "x", "--device", "tpu"], ["device", "tpu"]),
    ("model-unknown", ["generate", "x", "--model", "no-such-model"], ["unknown model"]),
    ("model-missing-folder", ["generate", "x", "--model", "./no/such/folder"], ["not found"]),
    ("model-is-file", ["generate", "x", "--model", "{in}/afile.txt"], ["is a file"]),
    ("model-empty-folder", ["generate", "x", "--model", "{in}/emptymodel"], ["holds no Kandinsky 3 model"]),
    ("weights-nan", ["generate", "x", "--model", "{in}/nanmodel"], ["NaN", "{poisoned:nanmodel}"]),
    ("weights-inf", ["generate", "x", "--model", "{in}/infmodel"], ["inf", "{poisoned:infmodel}"]),
    ("weights-corrupt", ["generate", "x", "--model", "{in}/corruptmodel"], ["not a valid safetensors file"]),
    (
        "wrong-task-model",
        ["inpaint", "{in}/ok.png", "{in}/mask.png", "x", "--model", "tiny"],
        ["needs an inpainting model", "--model inpainting"],
    ),
    # -- input images -------------------------------------------------------------------------------------------
    ("image-missing", ["edit", "{in}/missing.png", "x"], ["image not found"]),
    ("image-empty", ["edit", "{in}/empty.png", "x"], ["empty"]),
    ("image-not-an-image", ["edit", "{in}/text.png", "x"], ["not an image"]),
    ("image-truncated", ["edit", "{in}/truncated.png", "x"], ["truncated"]),
    ("image-is-folder", ["edit", "{in}/folder.png", "x"], ["is a folder"]),
    ("image-bomb", ["edit", "{in}/ok.png", "x"], ["decompression bomb"]),
    ("edit-strength-0", ["edit", "{in}/ok.png", "x", "--strength", "0"], ["strength"]),
    ("edit-strength-over-1", ["edit", "{in}/ok.png", "x", "--strength", "1.5"], ["strength"]),
    ("edit-strength-nan", ["edit", "{in}/ok.png", "x", "--strength", "nan"], ["strength", "finite"]),
    ("edit-width-not-multiple", ["edit", "{in}/ok.png", "x", "--model", "tiny", "--width", "100"], ["multiple"]),
    ("mask-missing", ["inpaint", "{in}/ok.png", "{in}/missing.png", "x"], ["image not found"]),
    ("mask-empty", ["inpaint", "{in}/ok.png", "{in}/empty.png", "x"], ["empty"]),
    ("mask-wrong-size", ["inpaint", "{in}/ok.png", "{in}/mask32.png", "x"], ["does not match the image size"]),
    ("outpaint-no-margin", ["outpaint", "{in}/ok.png", "x"], ["margins"]),
    ("outpaint-negative", ["outpaint", "{in}/ok.png", "x", "--left", "-5"], ["margins"]),
    (
        "outpaint-huge",
        ["outpaint", "{in}/ok.png", "x", "--model", "inpainting", "--left", "10000000"],
        ["GiB", "smaller --left/--right/--top/--bottom"],
    ),
    ("outpaint-text-model", ["outpaint", "{in}/ok.png", "x", "--left", "64"], ["needs an inpainting model"]),
    ("generate-inpainting-model", ["generate", "x", "--model", "inpainting"], ["is an inpainting model", "inpaint"]),
    ("mix-image-missing", ["mix", "{in}/ok.png", "{in}/missing.png"], ["image not found"]),
    ("mix-image-not-an-image", ["mix", "{in}/text.png", "{in}/ok.png"], ["not an image"]),
    (
        "control-init-missing",
        ["control", "{in}/ok.png", "x", "--init-image", "{in}/missing.png", "--strength", "0.5"],
        ["image not found"],
    ),
    ("control-init-strength-1", ["control", "{in}/ok.png", "x", "--init-image", "{in}/ok.png"], ["strength 1"]),
    (
        "control-hed-weights-soft",
        ["control", "{in}/ok.png", "x", "--edges", "soft", "--hed-weights", "h.pth"],
        ["hed_weights is only used"],
    ),
    ("quantization-on-cpu", ["generate", "x", "--text-encoder-quantization", "8bit", "--device", "cpu"], ["CUDA"]),
    ("variant-beside-a-name", ["generate", "x", "--variant", "flash"], ["--model flash"]),
    ("beautify-unknown", ["generate", "x", "--beautify", "bogus"], ["beautify must be", "'bogus'"]),
    # -- batches ------------------------------------------------------------------------------------------------
    ("out-dir-without-prompts", ["generate", "x", "--out-dir", "{out}/b"], ["--out-dir is for batches", "--out"]),
    (
        "prompt-and-prompts",
        ["generate", "x", "--prompts", "{in}/prompts.txt", "--out-dir", "{out}/b"],
        ["--prompts FILE were both given"],
    ),
    (
        "batch-size-0",
        ["generate", "--prompts", "{in}/prompts.txt", "--out-dir", "{out}/b", "--batch-size", "0"],
        ["--batch-size must be 1 or more"],
    ),
    ("prompts-empty", ["generate", "--prompts", "{in}/blank.txt", "--out-dir", "{out}/b"], ["holds no prompts"]),
    ("out-dir-is-file", ["generate", "--prompts", "{in}/prompts.txt", "--out-dir", "{in}/afile.txt"], ["is a file"]),
    # -- upscale ------------------------------------------------------------------------------------------------
    ("upscale-steps-huge", ["upscale", "{in}/ok.png", "--steps", "2000"], ["between 1 and 1000"]),
    ("upscale-missing", ["upscale", "{in}/missing.png"], ["image not found"]),
    ("upscale-truncated", ["upscale", "{in}/truncated.png"], ["truncated"]),
    ("upscale-steps-0", ["upscale", "{in}/ok.png", "--steps", "0"], ["--steps"]),
    ("upscale-window", ["upscale", "{in}/ok.png", "--window", "-1"], ["--window"]),
    ("upscale-seed", ["upscale", "{in}/ok.png", "--seed", "-1"], ["--seed"]),
    ("upscale-out-exists", ["upscale", "{in}/ok.png", "--out", "{in}/ok.png"], ["exists", "--overwrite"]),
    ("upscale-out-ext", ["upscale", "{in}/ok.png", "--out", "{out}/x.bmp"], ["unknown image extension"]),
    # -- convert / info -----------------------------------------------------------------------------------------
    ("convert-missing", ["convert", "{in}/missing", "{out}/d", "--to", "native"], ["not found"]),
    ("convert-same", ["convert", "{in}/tinymodel", "{in}/tinymodel", "--to", "official"], ["same folder"]),
    ("convert-dst-file", ["convert", "{in}/tinymodel", "{in}/afile.txt", "--to", "official"], ["is a file"]),
    ("convert-dst-not-empty", ["convert", "{in}/tinymodel", "{in}/nanmodel", "--to", "native"], ["--overwrite"]),
    ("convert-not-a-model", ["convert", "{in}/emptymodel", "{out}/d", "--to", "native"], ["no Kandinsky 3 model"]),
    ("info-missing", ["info", "{in}/missing"], ["not found"]),
    ("info-variant-unknown", ["info", "--variant", "foo"], ["unknown variant 'foo'", "flash"]),
    ("info-not-a-model", ["info", "{in}/emptymodel"], ["no Kandinsky 3 model"]),
    # -- eval / train -------------------------------------------------------------------------------------------
    ("eval-num-0", ["eval", "alignment", "--num", "0"], ["--num"]),
    ("eval-num-negative", ["eval", "movq", "--num", "-1"], ["--num"]),
    ("eval-steps-0", ["eval", "alignment", "--steps", "0"], ["--steps"]),
    ("eval-guidance-nan", ["eval", "alignment", "--guidance", "nan"], ["--guidance"]),
    ("eval-world-0", ["eval", "superres", "--world", "0"], ["--world"]),
    ("eval-hr-dir-missing", ["eval", "superres", "--hr-dir", "{in}/missing"], ["--hr-dir"]),
    ("eval-device", ["eval", "alignment", "--device", "cuda:99"], ["--device cuda:99"]),
    ("eval-missing-extra", ["eval", "alignment"], ["scipy", 'pip install -e ".[eval]"']),
    (
        "train-missing-extra",
        ["train", "toy_gan", "--config", TOY],
        ['pip install -e ".[train]"'],
    ),
    ("train-steps-0", ["train", "toy_gan", "--config", TOY, "--steps", "0"], ["--steps"]),
    (
        "train-max-steps-0",
        ["train", "toy_gan", "--config", TOY, "--max-steps", "0"],
        ["max-steps"],
    ),
    (
        "train-budget",
        ["train", "toy_gan", "--config", TOY, "--time-budget", "-1"],
        ["budget"],
    ),
    ("train-no-config", ["train", "toy_gan", "--config", "{in}/missing.yaml"], ["missing.yaml"]),
    ("train-invalid-yaml", ["train", "toy_gan", "--config", "{in}/bad.yaml"], ["bad.yaml", "line 3"]),
    ("train-unknown-key", ["train", "toy_gan", "--config", "{in}/unknown_key.yaml"], ["no_such_key"]),
    ("train-unknown-recipe", ["train", "gan", "--config", TOY], ["unknown recipe 'gan'"]),
    ("train-recipe-mismatch", ["train", "movq", "--config", TOY], ["not 'movq'"]),
]

# argparse's own refusals: a usage line, then one error line (exit status 2)
ARGPARSE_CASES = [
    ("steps-not-a-number", ["generate", "x", "--steps", "abc"], ["--steps"]),
    ("seed-without-value", ["generate", "x", "--seed"], ["--seed"]),
    ("sampler-unknown", ["generate", "x", "--sampler", "nope"], ["--sampler"]),
    ("rounding-unknown", ["generate", "x", "--pixel-rounding", "up"], ["--pixel-rounding"]),
    ("upscale-choice", ["generate", "x", "--upscale", "3"], ["--upscale"]),
    ("upscale-scale-3", ["upscale", "{in}/ok.png", "--scale", "3"], ["--scale"]),
    ("convert-layout", ["convert", "a", "b", "--to", "onnx"], ["--to"]),
    ("eval-what", ["eval", "speed"], ["speed"]),
    ("no-command", [], ["COMMAND"]),
]


def _fill(argv, inputs, out):
    return [a.replace("{in}", str(inputs)).replace("{out}", str(out)).replace("{repo}", str(REPO)) for a in argv]


def _fault(case_id, monkeypatch, inputs, out, tiny):
    """The setup a case needs beyond its command line."""
    if case_id == "out-numbered-exists":
        (out / "taken-1.png").write_bytes(b"keep me")
    if case_id == "out-read-only":
        (out / "ro.png").write_bytes(b"keep me")
        os.chmod(out / "ro.png", 0o444)
    if case_id == "out-folder-not-writable":  # root may write anywhere: make the folder look read-only
        real = os.access
        monkeypatch.setattr(cli.os, "access", lambda p, m: False if Path(p) == out else real(p, m))
    if case_id == "image-bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    if case_id in ("eval-missing-extra", "train-missing-extra"):
        missing, module = ("scipy", "eval") if case_id.startswith("eval") else ("accelerate", "training")
        real_import = builtins.__import__

        def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
            if level == 1 and name.split(".")[0] == module:
                raise ModuleNotFoundError(f"No module named '{missing}'", name=missing)
            return real_import(name, globals, locals, fromlist, level)

        monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(cli, "_pipeline", lambda args: tiny if args.model == "tiny" else _real_pipeline(args))


_real_pipeline = cli._pipeline


def _expected(words, inputs):
    out = []
    for w in words:
        if w.startswith("{poisoned:"):
            w = (inputs / w[len("{poisoned:") : -1] / "poisoned.txt").read_text()
        out.append(w)
    return out


#: refused before any model loads (each was refused only after loading once)
BEFORE_LOADING = {
    "wrong-task-model",
    "outpaint-text-model",
    "generate-inpainting-model",
    "mix-image-missing",
    "mix-image-not-an-image",
    "control-init-missing",
    "control-init-strength-1",
    "quantization-on-cpu",
    "variant-beside-a-name",
    "beautify-unknown",
    "out-dir-without-prompts",
    "prompt-and-prompts",
    "batch-size-0",
    "prompts-empty",
    "out-dir-is-file",
}


def _no_loading(args):
    raise AssertionError("the model was loaded before the input was checked")


@pytest.mark.parametrize("case_id, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case_id, argv, words, inputs, tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)  # default outputs (kandinsky3.png, upscaled.png) would land here
    _fault(case_id, monkeypatch, inputs, out, tiny)
    if case_id in BEFORE_LOADING:
        monkeypatch.setattr(cli, "_pipeline", _no_loading)
    before = _snapshot(out, inputs, PACKAGE)
    rc = cli.main(_fill(argv, inputs, out))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, captured
    assert len(lines) == 1 and lines[0].startswith(f"kandinsky3 {argv[0]}: error: "), lines
    for word in _expected(words, inputs):
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in captured.err and captured.out == ""
    assert _snapshot(out, inputs, PACKAGE) == before


@pytest.mark.parametrize("case_id, argv, words", ARGPARSE_CASES, ids=[c[0] for c in ARGPARSE_CASES])
def test_bad_arguments_are_argparse_errors(case_id, argv, words, inputs, tmp_path, capsys):
    before = _snapshot(tmp_path, inputs)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(_fill(argv, inputs, tmp_path))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert lines[0].startswith("usage:") and "error:" in lines[-1]
    assert all(word in lines[-1] for word in words), lines[-1]
    assert _snapshot(tmp_path, inputs) == before


def test_the_table_is_large():
    assert len(CASES) + len(ARGPARSE_CASES) >= 60
    assert len({c[0] for c in CASES + ARGPARSE_CASES}) == len(CASES) + len(ARGPARSE_CASES)


# -- faults during a run, and inputs that are not errors -------------------------------------------------------


def _run(argv, monkeypatch, tiny, capsys):
    monkeypatch.setattr(cli, "_pipeline", lambda args: tiny)
    rc = cli.main(argv + ["--model", "tiny", "--steps", "1", "--no-progress"])
    captured = capsys.readouterr()
    return rc, [line for line in captured.err.splitlines() if line.strip()], captured


def test_ctrl_c_is_one_line_exit_130_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys):
    def interrupted(step, t, latents):
        raise KeyboardInterrupt

    real_run = tiny.run
    monkeypatch.setattr(tiny, "run", lambda request, **kw: real_run(request, **{**kw, "callback": interrupted}))
    rc, lines, captured = _run(["generate", "a star", "--out", str(tmp_path / "x.png")], monkeypatch, tiny, capsys)
    assert rc == 130 and lines == ["kandinsky3 generate: interrupted"] and "Traceback" not in captured.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "P-transparent", "CMYK", "L", "I;16", "I", "F"])
def test_image_modes_convert_with_at_most_one_warning(mode, tiny, tmp_path, monkeypatch, capsys):
    rgb = Image.new("RGB", (64, 64), (200, 30, 30))
    image = {
        "I;16": Image.fromarray(np.full((64, 64), 40000, np.uint16)),
        "I": Image.fromarray(np.full((64, 64), 40000, np.int32)),
        "F": Image.fromarray(np.full((64, 64), 0.5, np.float32)),
        "P-transparent": rgb.convert("P"),
    }.get(mode) or rgb.convert(mode)
    if mode == "P-transparent":
        image.info["transparency"] = 0
    path = tmp_path / ("in.tif" if mode in ("I", "F", "CMYK") else "in.png")
    image.save(path)
    out = tmp_path / "out.png"
    rc, lines, captured = _run(["edit", str(path), "a red circle", "--out", str(out)], monkeypatch, tiny, capsys)
    assert rc == 0 and "Traceback" not in captured.err and out.is_file()
    has_alpha = mode in ("RGBA", "LA", "P-transparent")
    assert len(lines) == (1 if has_alpha else 0) and all("transparency" in line for line in lines), lines


def test_sixteen_bit_grey_is_read_by_its_range_not_as_white(tmp_path):
    for value in (0, 30000, 65535):
        Image.fromarray(np.full((8, 8), value, np.uint16)).save(tmp_path / "g.png")
        assert Image.open(tmp_path / "g.png").mode.startswith("I")
        assert as_pil(tmp_path / "g.png").getpixel((0, 0)) == (round(value / 257),) * 3


def test_unknown_words_and_untrained_size_warn_once_each(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x.png"
    argv = ["generate", "a red zebra and a xylophone", "--width", "192", "--height", "192", "--out", str(out)]
    rc, lines, _ = _run(argv, monkeypatch, tiny, capsys)
    assert rc == 0 and len(lines) == 2, lines
    words, size = sorted(lines, key=lambda line: "tokenizer" not in line)
    assert "'zebra', 'xylophone'" in words and "warning" in words
    assert "192x192" in size and "64x64" in size
    rc, lines, _ = _run(["generate", "a red circle", "--out", str(tmp_path / "y.png")], monkeypatch, tiny, capsys)
    assert rc == 0 and lines == []
    long = " ".join(["a red circle"] * 50)  # 150 words, one token each in tiny's word vocabulary
    rc, lines, _ = _run(["generate", long, "--out", str(tmp_path / "z.png")], monkeypatch, tiny, capsys)
    cut = 150 + 1 - tiny.text_encoder.max_length
    assert rc == 0 and len(lines) == 1 and f"{cut} token(s) longer" in lines[0] and "Token indices" not in lines[0]


def test_overwrite_replaces_and_formats_follow_the_extension(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x.png"
    out.write_bytes(b"old")
    rc, _, _ = _run(["generate", "a red circle", "--out", str(out), "--overwrite"], monkeypatch, tiny, capsys)
    assert rc == 0 and Image.open(out).format == "PNG"
    for ext, fmt in ((".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")):
        path = tmp_path / f"x{ext}"
        rc, _, _ = _run(["generate", "a red circle", "--seed", "7", "--out", str(path)], monkeypatch, tiny, capsys)
        assert rc == 0 and Image.open(path).format == fmt
        assert read_metadata(path)["seed"] == 7 and read_metadata(path)["prompt"] == "a red circle"


def test_weights_with_nan_are_refused_by_the_api(inputs):
    from kandinsky3 import CheckpointError, Kandinsky3

    key = (inputs / "nanmodel" / "poisoned.txt").read_text()
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        Kandinsky3.from_pretrained(str(inputs / "nanmodel"), device="cpu")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_no_progress_and_logs_get_no_bars(terminal, inputs, tmp_path, monkeypatch):
    """A real load from files (T5 through transformers, which draws a 'Loading weights' bar): on a terminal,
    --no-progress hides every bar; into a log (not a terminal), no bar and no carriage return is drawn at all."""
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    argv = ["generate", "a red circle", "--model", str(inputs / "tinymodel"), "--steps", "2"]
    rc = cli.main(argv + ["--out", str(tmp_path / "x.png")] + (["--no-progress"] if terminal else []))
    assert rc == 0 and "Loading" not in stderr.getvalue() and "\r" not in stderr.getvalue()
