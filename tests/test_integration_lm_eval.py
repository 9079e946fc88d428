"""`pvq-cuda eval --tasks`: lm-evaluation-harness on PVQ models with local task files only."""

import json

import pytest

pytest.importorskip("lm_eval")

import pvq_cuda  # noqa: E402
from pvq_cuda.apps.cli import main  # noqa: E402
from pvq_cuda.integrations.lm_eval_harness import held_out_documents  # noqa: E402
from tiny_llama import TEXT, tiny_model, tiny_tokenizer  # noqa: E402

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    model = tiny_model()
    pvq_cuda.quantize_model(model, method="pvq-datafree", progress=False, device="cpu")
    pvq_cuda.save_quantized(model, root / "q", tokenizer=tiny_tokenizer())
    (root / "text.txt").write_text(TEXT)
    tasks = root / "tasks"
    tasks.mkdir()
    rows = [{"question": f"what is {i} plus one", "choices": [str(i + 1), str(i + 7), "none"], "label": 0}
            for i in range(6)]
    (tasks / "tiny_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny_mc.yaml").write_text(MC_YAML.format(data=json.dumps(str(tasks / "tiny_mc.jsonl"))))
    return root


def test_local_multiple_choice_and_shipped_perplexity(tiny, capsys):
    rc = main(["eval", "--model", str(tiny / "q"), "--calib", str(tiny / "text.txt"), "--tasks",
               "tiny_mc,pvq_heldout", "--task-dir", str(tiny / "tasks"), "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["kind"] == "pvq" and "held-out last 10%" in out["pvq_heldout_sources"]["pvq_heldout_text"]
    mc, ppl = out["results"]["tiny_mc"], out["results"]["pvq_heldout_text"]
    assert 0.0 <= mc["acc,none"] <= 1.0
    assert ppl["word_perplexity,none"] > 1 and ppl["byte_perplexity,none"] > 1 and ppl["bits_per_byte,none"] > 0


def test_table_output_and_limit(tiny, capsys):
    rc = main(["eval", "--model", str(tiny / "q"), "--tasks", "tiny_mc", "--task-dir", str(tiny / "tasks"),
               "--limit", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "tiny_mc" in out and "acc" in out


def test_unknown_task_and_missing_dir(tiny, tmp_path, capsys):
    rc = main(["eval", "--model", str(tiny / "q"), "--tasks", "no_such_task", "--device", "cpu"])
    assert rc == 2 and "--tasks: unknown task(s) ['no_such_task']" in capsys.readouterr().err
    rc = main(["eval", "--model", str(tiny / "q"), "--tasks", "tiny_mc", "--task-dir", str(tmp_path / "nope"),
               "--device", "cpu"])
    assert rc == 2 and "--task-dir: no such directory" in capsys.readouterr().err


def test_held_out_documents_cut_at_paragraphs():
    text = "\n\n".join(f"paragraph {i} " + "x" * 300 for i in range(40))
    docs = held_out_documents(text, chars=1000)
    assert "\n\n".join(docs) == text and all(len(d) <= 1400 for d in docs) and len(docs) > 5
