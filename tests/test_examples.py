"""The examples run end to end and learn: examples/train_lm.py and examples/classify.py.

Each runs in ``--short`` mode in a subprocess (as a user would run it), on the CPU, and its final
table is parsed: the language models must reach a held-out bits-per-character well below the
uniform baseline log2(vocabulary) with a falling training loss, and the classifiers an accuracy
well above chance (10%). Together about 30 s on 2 CPU cores.
"""

import math
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TIMEOUT_S = 300  # far above the ~15 s each takes, for loaded machines

sys.path.insert(0, EXAMPLES)
import corpus  # noqa: E402


def run_example(script, *args):
    """Runs examples/<script> with ``args`` on the CPU; returns its stdout, failing on an error."""
    command = [sys.executable, os.path.join(EXAMPLES, script), "--device", "cpu", *args]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
                            cwd=ROOT)
    assert result.returncode == 0, (f"{' '.join(command)} exited {result.returncode}\n"
                                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result.stdout


def table_rows(stdout):
    """{model: the row's fields} for the final table: the lines between its ---- rule and the
    next line that does not start with a model name."""
    rows = {}
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("----")) + 1
    for line in lines[start:]:
        fields = line.split()
        if not fields or fields[0] not in ("SRU", "SRU++", "LSTM"):
            break
        rows[fields[0]] = fields
    return rows


# -- the corpus ------------------------------------------------------------------------------------

def test_stdlib_corpus_is_deterministic_and_sizeable():
    text, description = corpus.stdlib_corpus()
    again, _ = corpus.stdlib_corpus()
    assert text == again
    assert len(text) >= corpus.MIN_CORPUS_CHARS
    assert "standard library" in description
    vocab = corpus.Vocabulary(text)
    assert 60 <= vocab.size <= 128
    sample = text[:500]
    assert vocab.decode(vocab.encode(sample)) == sample
    train, held_out = corpus.split(vocab.encode(text), held_out_fraction=0.1)
    assert len(train) + len(held_out) == len(text)
    assert abs(len(held_out) - len(text) // 10) <= 1


# -- train_lm.py -----------------------------------------------------------------------------------

def test_train_lm_short_learns():
    """SRU, SRU++ and LSTM (the default --model all), the same budget each."""
    out = run_example("train_lm.py", "--short")
    vocab_size = int(re.search(r"uniform baseline: log2\((\d+)\)", out).group(1))
    uniform = math.log2(vocab_size)
    rows = table_rows(out)
    assert list(rows) == ["SRU", "SRU++", "LSTM"], out
    assert re.search(r"training throughput / LSTM: SRU [\d.]+x, SRU\+\+ [\d.]+x", out), out
    # about the same size: SRU++ (attention width hidden / 2) within 25 % of the SRU
    sru_params, srupp_params = (int(rows[m][1].replace(",", "")) for m in ("SRU", "SRU++"))
    assert abs(srupp_params - sru_params) < 0.25 * sru_params, out
    for label, fields in rows.items():
        # model  params  steps  first -> last  held-out  chars/s  device
        _, _, steps, first, arrow, last, held_out, chars_per_s, device = fields
        assert arrow == "->" and device == "cpu", out
        assert int(steps) > 0 and float(chars_per_s.replace(",", "")) > 0, out
        first, last, held_out = float(first), float(last), float(held_out)
        assert first > uniform - 0.5, f"{label}: an untrained model starts near uniform\n{out}"
        assert last < first - 1.5, f"{label}: the training loss did not fall enough\n{out}"
        assert held_out < uniform - 1.5, f"{label}: held-out bpc not clearly below uniform\n{out}"


def test_train_lm_single_model_with_own_text(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 400
    data = tmp_path / "fox.txt"
    data.write_text(text)
    out = run_example("train_lm.py", "--short", "--model", "sru", "--data", str(data),
                      "--steps", "60")
    rows = table_rows(out)
    assert set(rows) == {"SRU"}, out
    assert int(rows["SRU"][2]) == 60, out
    # A repeated sentence over 28 distinct characters: learnt well within 60 steps.
    assert "log2(28)" in out, out
    assert float(rows["SRU"][6]) < math.log2(28) - 2.0, out


def test_train_lm_srupp_with_own_text(tmp_path):
    """SRU++ alone, with its attention width given."""
    data = tmp_path / "fox.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = run_example("train_lm.py", "--short", "--model", "srupp", "--proj", "32", "--data",
                      str(data), "--steps", "60")
    rows = table_rows(out)
    assert set(rows) == {"SRU++"}, out
    assert "attention 32" in out, out
    assert int(rows["SRU++"][2]) == 60, out
    assert float(rows["SRU++"][6]) < math.log2(28) - 2.0, out


def test_srupp_language_model_does_not_see_later_characters():
    """The SRU++ of train_lm.py attends causally: h at step t ignores the inputs after t."""
    import torch
    import train_lm
    torch.manual_seed(0)
    model = train_lm.CharLM("srupp", 20, 16, 2, 8)
    x = torch.randint(0, 20, (9, 2))
    later = x.clone()
    later[5:] = (later[5:] + 1) % 20
    logits, _ = model(x)
    logits_later, _ = model(later)
    torch.testing.assert_close(logits_later[:5], logits[:5])
    assert not torch.allclose(logits_later[5:], logits[5:])


def test_train_lm_rejects_fp16_on_cpu():
    command = [sys.executable, os.path.join(EXAMPLES, "train_lm.py"), "--device", "cpu",
               "--precision", "fp16", "--short"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode != 0
    assert "bf16" in result.stderr


# -- classify.py -----------------------------------------------------------------------------------

def test_classify_short_learns():
    pytest.importorskip("sklearn")
    out = run_example("classify.py", "--short")
    rows = table_rows(out)
    assert set(rows) == {"SRU", "LSTM"}, out
    for label, fields in rows.items():
        # model  params  epochs  accuracy  time  seq/s  device
        accuracy = float(fields[3].rstrip("%"))
        assert accuracy > 40.0, f"{label}: accuracy {accuracy}% is not clearly above chance\n{out}"
