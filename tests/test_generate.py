"""``python -m slim_lightning.generate``: streaming, statistics line, options, bad input."""

from __future__ import annotations

import io
import re

import pytest
import torch
from conftest import compose_config

from slim_lightning import load_compressed
from slim_lightning.app.compress_run import run_compress
from slim_lightning.deploy.generate import main, prompt_ids

PROMPT = "def add(a, b):\n    return"
STATS = re.compile(
    r"\[(\d+) new tokens in [\d.]+ s: [\d.]+ tok/s \| prompt \d+ tokens \| peak RSS \d+ MiB"
)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gen")
    cfg = compose_config(
        "compress", ["debug=default", "eval_dense=false", "calib.nsamples=4", "eval.max_windows=1"]
    )
    run_compress(cfg, run_dir)
    return run_dir / "packed"


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_greedy_stream_matches_generate(packed, capsys):
    model, tok, _ = load_compressed(packed)
    assert not getattr(tok, "chat_template", None)  # the tiny byte tokenizer: plain prompt
    ids = tok(PROMPT, return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=True)
    no_cache = model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=False)
    assert torch.equal(ref, no_cache)  # the KV cache path is exact with SLiMLinear layers
    expected = tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)

    argv = [str(packed), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "16"]
    rc, out, err = _run(argv, capsys)
    assert rc == 0
    assert out == expected + "\n"  # prompt not echoed; the streamer ends with a newline
    m = STATS.search(err)
    assert m and int(m.group(1)) == ref.shape[1] - ids.shape[1], err

    # --dense-cache and the reference backend do not change greedy output
    rc, out2, _ = _run([*argv, "--dense-cache", "--backend", "reference"], capsys)
    assert rc == 0 and out2 == out


def test_sampling_seed_and_stdin(packed, capsys, monkeypatch):
    argv = [str(packed), "--temperature", "1.0", "--top-p", "0.9", "--top-k", "20", "--seed", "3"]
    argv += ["--max-new-tokens", "12"]
    _, a, _ = _run([*argv, "--prompt", PROMPT], capsys)
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    _, b, err = _run([*argv, "--prompt", "-"], capsys)
    assert a == b and STATS.search(err)


def test_chat_template_is_applied_unless_no_chat(packed):
    _, tok, _ = load_compressed(packed, verify=False)
    plain, _ = prompt_ids(tok, "hi", chat=True)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}>"
    chat, _ = prompt_ids(tok, "hi", chat=True)
    assert tok.decode(chat[0]) == "<user>hi>"
    assert torch.equal(prompt_ids(tok, "hi", chat=False)[0], plain)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "x"], "--top-k"),
        (["--threads", "0"], "--threads"),
        (["--dtype", "int8"], "--dtype"),
        (["--backend", "cuda"], "--backend"),
        (["--prompt", "   "], "prompt is empty"),
    ],
)
def test_bad_options_exit_with_one_line(packed, capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        main([str(packed), "--prompt", "x", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_bad_checkpoints_exit_with_one_line(packed, tmp_path, capsys):
    cases = [
        (tmp_path / "missing", "no such directory"),
        (tmp_path, "not a slim-lightning checkpoint"),
        (packed / "slim.json", "not a directory"),
    ]
    if not torch.cuda.is_available():
        cases.append((packed, "no CUDA device"))
    for path, needle in cases:
        extra = ["--device", "cuda"] if needle == "no CUDA device" else []
        with pytest.raises(SystemExit) as e:
            main([str(path), "--prompt", "x", *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_max_new_tokens_beyond_the_positions_is_refused(packed, capsys, monkeypatch):
    """Past the model's positions: refused before the weights load (config.json), and after
    the prompt is tokenised when prompt + new tokens no longer fit."""

    def refuse(*a, **k):
        raise AssertionError("the weights were loaded before the bad option was refused")

    with monkeypatch.context() as m:
        m.setattr("slim_lightning.checkpoint.load_compressed", refuse)
        with pytest.raises(SystemExit) as e:
            main([str(packed), "--prompt", "x", "--max-new-tokens", "100000"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--max-new-tokens: got 100000" in err and "2048" in err
    with pytest.raises(SystemExit) as e:  # 2040 new + a prompt of more than 8 tokens > 2048
        main([str(packed), "--prompt", PROMPT, "--no-chat", "--max-new-tokens", "2040"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the prompt takes" in err, err
