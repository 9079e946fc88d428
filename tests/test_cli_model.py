"""CLI smoke tests on a tiny random Llama and a tiny text file (CPU, offline)."""

import json
import re

import pytest
import torch

pytest.importorskip("transformers")

from pvq_cuda.apps.cli import main  # noqa: E402
from tiny_llama import TEXT, write_tiny_model_dir  # noqa: E402

SMALL = ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_model_dir(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root


def test_fp_targets_default_per_method():
    from pvq_cuda.apps.jobs import fp_targets_for
    assert fp_targets_for("gptq-int4", None) and fp_targets_for("gptq-rot-int3-g64", None)
    assert not fp_targets_for("pvq", None) and not fp_targets_for("rtn-int4", None)
    assert fp_targets_for("pvq", True) and not fp_targets_for("gptq-int4", False)
    assert not fp_targets_for("pvq-datafree", True) and not fp_targets_for("rtn-int4", True)  # no Hessian


def test_search_default_per_rate():
    """Hessian-aware PVQ below SEARCH_BELOW_BPW searches harder unless told; nothing else does."""
    from pvq_cuda.apps.jobs import REFINE_PASSES, SEARCH_BELOW_BPW, search_for
    low, high = SEARCH_BELOW_BPW - 0.75, SEARCH_BELOW_BPW + 0.25
    assert search_for("pvq", low, None, None) == (True, REFINE_PASSES)
    assert search_for("pvq", high, None, None) == (False, 0)
    assert search_for("pvq", low, False, 0) == (False, 0) and search_for("pvq", high, True, 3) == (True, 3)
    assert search_for("pvq", low, None, 1) == (True, 1)
    assert search_for("pvq", low, False, None) == (False, REFINE_PASSES)
    assert search_for("pvq-datafree", low, None, None) == (False, 0)  # no Hessian, not measured
    assert search_for("gptq-int2", low, True, 2) == (False, 0)  # only PVQ searches


def test_run_options_search_by_row_rate():
    """Each compare row searches by its own rate: an allocated row by its --bpw, a preset row by the
    preset's code rate (pvq-2.25 searches, pvq-3.25 does not); an explicit flag wins everywhere."""
    from types import SimpleNamespace

    from pvq_cuda.apps.jobs import REFINE_PASSES, Job, _run_options

    def opts(preset, metric_search=None, refine_passes=None, method="pvq"):
        args = SimpleNamespace(ignore=None, offload=False, act_order=False, metric_search=metric_search,
                               refine_passes=refine_passes, fp_targets=None, tune_epochs=0, tune_lr=None,
                               no_progress=True, batch_size=1, seed=0)
        job = Job(lm=None, calibration=torch.zeros(1, 1), evaluation={}, data_info={}, device=torch.device("cpu"),
                  args=args)
        o = _run_options(job, method, preset, None)
        return o["metric_search"], o["refine_passes"]

    assert opts("pvq-2.25") == (True, REFINE_PASSES) and opts("pvq8-2.25") == (True, REFINE_PASSES)
    assert opts("pvq-3.25") == (False, 0) and opts("pvq-4.25") == (False, 0) and opts(None) == (False, 0)
    assert opts("2.5bpw") == (True, REFINE_PASSES) and opts("3.5bpw") == (False, 0)
    assert opts("pvq-2.25", False, 0) == (False, 0) and opts("pvq-3.25", True, 1) == (True, 1)
    assert opts("pvq-2.25", method="pvq-datafree") == (False, 0)


def test_quantize_evaluates_on_the_domains_calibration_does_not_read():
    """quantize's default evaluation: every domain but the calibration's (the others' defaults,
    files and an explicit --eval are unchanged)."""
    from types import SimpleNamespace

    from pvq_cuda.apps.domains import EVALUATION_DOMAINS
    from pvq_cuda.apps.jobs import _sources

    def sources(calib=None, eval=None, unseen_only=True):
        return _sources(SimpleNamespace(calib=calib, eval=eval), True, unseen_only)

    others = [d for d in EVALUATION_DOMAINS if d != "jargon"]
    assert sources() == (["jargon"], others) and sources(unseen_only=False) == (["jargon"], list(EVALUATION_DOMAINS))
    assert sources("jargon,fortunes") == (["jargon", "fortunes"], [d for d in others if d != "fortunes"])
    assert sources("a.txt") == (["a.txt"], ["a.txt"]) and sources("jargon,a.txt") == (["jargon", "a.txt"],) * 2
    assert sources(",".join(EVALUATION_DOMAINS))[1] == list(EVALUATION_DOMAINS)  # none left: their held-out parts
    assert sources(eval="jargon") == (["jargon"], ["jargon"])


def test_quantize_then_eval(tiny, capsys):
    out = tiny / "out"
    rc = main(["quantize", "--model", str(tiny / "model"), "--calib", str(tiny / "text.txt"), *SMALL,
               "--baselines", "gptq-int4", "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert lines[-1].startswith("perplexity: ")
    ppl_quantize = float(lines[-1].split()[1])
    # the default: each layer's config allocated for 3.25 bpw (--config gives one preset instead)
    assert "| fp32 (unquantized) |" in captured.out and "PVQ at 3.25 bpw (allocated)" in captured.out
    log = json.loads((out / "quantization_log.json").read_text())
    run = log["runs"]["pvq:3.25bpw"]
    assert run["allocation"]["bpw"] == 3.25 and abs(run["bpw"] - 3.25) <= 0.01
    assert len(run["layers"]) == 14 and all("loss" in e and "seconds" in e for e in run["layers"])
    # the CLI's default per method (README: levers out of domain): off for PVQ, on for GPTQ
    assert run["fp_targets"] is False and log["runs"]["gptq-int4"]["fp_targets"] is True
    text = log["data"]["sources"][str(tiny / "text.txt")]
    assert log["data"]["nsamples"] == 4 and text["calibration_tokens"][1] <= text["evaluation_tokens"][0]
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()

    rc = main(["eval", "--model", str(out), "--calib", str(tiny / "text.txt"), *SMALL[2:]])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    last = captured.out.strip().splitlines()[-1]
    assert last.startswith("perplexity: ")
    assert float(last.split()[1]) == pytest.approx(ppl_quantize, rel=1e-3)

    rc = main(["eval", "--model", str(out), "--calib", str(tiny / "text.txt"), *SMALL[2:], "--json"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0 and result["kind"] == "pvq" and result["quantization_config"]["quant_method"] == "pvq"
    assert result["perplexity"] == pytest.approx(ppl_quantize, rel=1e-3) and result["windows"] == 3


def test_quantize_at_any_rate(tiny, capsys):
    out = tiny / "out-rate"
    rc = main(["quantize", "--model", str(tiny / "model"), "--calib", str(tiny / "text.txt"), *SMALL,
               "--baselines", "none", "--no-progress", "--bpw", "2.7", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "PVQ at 2.7 bpw (allocated) Hessian-aware" in captured.out
    run = json.loads((out / "quantization_log.json").read_text())["runs"]["pvq:2.7bpw"]
    assert abs(run["bpw"] - 2.7) <= 0.01 and run["allocation"]["bpw"] == 2.7
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["module_overrides"]
    for bad, why in ((["--bpw", "5"], "--bpw: must be in [2.0, 4.5], got 5"),
                     (["--bpw", "x"], "--bpw: must be a number of bits per weight, got 'x'"),
                     (["--bpw", "3", "--config", "pvq-3.25"], "not allowed with argument")):
        with pytest.raises(SystemExit) as exit_info:
            main(["quantize", "--model", str(tiny / "model"), *bad])
        assert exit_info.value.code == 2 and why in capsys.readouterr().err


def test_quantize_with_tuning_within_blocks(tiny, capsys):
    out = tiny / "out-tune"
    rc = main(["quantize", "--model", str(tiny / "model"), "--calib", str(tiny / "text.txt"), *SMALL,
               "--baselines", "none", "--no-progress", "--tune-epochs", "2", "--tune-lr", "3e-4", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    run = json.loads((out / "quantization_log.json").read_text())["runs"]["pvq:3.25bpw"]
    assert run["tune_epochs"] == 2 and run["tune_lr"] == 3e-4
    assert [e["block"] for e in run["tune"]] == [0, 0, 0, 1, 1, 1]
    calib = json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]
    assert calib["tune_epochs"] == 2 and calib["tune_lr"] == 3e-4
    for bad, why in ((["--tune-epochs", "-2"], "--tune-epochs: must be a non-negative integer, got -2"),
                     (["--tune-lr", "0"], "--tune-lr: must be a positive number")):
        with pytest.raises(SystemExit) as exit_info:
            main(["quantize", "--model", str(tiny / "model"), *bad])
        assert exit_info.value.code == 2 and why in capsys.readouterr().err


def test_quantize_data_free_keeps_the_preset(tiny, capsys):
    """Without calibration the allocation would only weigh weight energy: data-free runs keep
    the pvq-3.25 preset unless --bpw asks for a rate."""
    out = tiny / "out-datafree"
    rc = main(["quantize", "--model", str(tiny / "model"), "--calib", str(tiny / "text.txt"), *SMALL,
               "--method", "pvq-datafree", "--baselines", "none", "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    run = json.loads((out / "quantization_log.json").read_text())["runs"]["pvq-datafree:pvq-3.25"]
    assert "allocation" not in run and run["config"]["K"] == 30


def test_quantize_with_finetune(tiny, capsys):
    out = tiny / "out-ft"
    rc = main(["quantize", "--model", str(tiny / "model"), "--calib", str(tiny / "text.txt"), *SMALL,
               "--baselines", "none", "--no-progress", "--config", "pvq-2.25", "--finetune", "5",
               "--finetune-blocks", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| PVQ pvq-2.25 Hessian-aware |" in captured.out
    assert "PVQ pvq-2.25 Hessian-aware + finetuned scales (1 block epoch, 5 steps)" in captured.out
    ppl = float(captured.out.strip().splitlines()[-1].split()[1])
    log = json.loads((out / "quantization_log.json").read_text())
    ft = log["runs"]["pvq:pvq-2.25"]["finetune"]
    assert ft["steps"] == 5 and ft["kl_held_out_before"] > 0 and ft["trained_parameters"] > 0
    assert ft["block_epochs"] == 1 and len(ft["block_loss"]) == 2 and ft["kl_held_out_after_blocks"] > 0
    assert ft["windows"] == 20 and ft["held_out"] == 2  # by default max(--nsamples 4, 4 x 5 steps)
    assert [r["method"] for r in log["results"]][-2:] == ["pvq:pvq-2.25", "pvq:pvq-2.25+finetune"]
    rc = main(["eval", "--model", str(out), "--calib", str(tiny / "text.txt"), *SMALL[2:]])
    assert rc == 0 and float(capsys.readouterr().out.strip().splitlines()[-1].split()[1]) == pytest.approx(ppl, rel=1e-3)


def spy_on_prepare(monkeypatch) -> dict:
    """What the next CLI call's jobs.prepare returns lands in the dict under "job"."""
    from pvq_cuda.apps import jobs
    seen, real = {}, jobs.prepare

    def spy(args, *a, **k):
        seen["job"] = real(args, *a, **k)
        return seen["job"]

    monkeypatch.setattr(jobs, "prepare", spy)
    return seen


def finetune_tiny(tiny, capsys, out, *options):
    """quantize the tiny model at pvq-2.25 with 2 fine-tuning steps and ``options``; its output."""
    rc = main(["quantize", "--model", str(tiny / "model"), "--calib", str(tiny / "text.txt"), *SMALL,
               "--baselines", "none", "--no-progress", "--config", "pvq-2.25", "--finetune", "2", *options,
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured


def test_quantize_finetune_lr_and_windows(tiny, capsys, monkeypatch):
    seen = spy_on_prepare(monkeypatch)
    out = tiny / "out-ft-options"
    captured = finetune_tiny(tiny, capsys, out, "--finetune-lr", "3e-3", "--finetune-windows", "16")
    assert "PVQ pvq-2.25 Hessian-aware + finetuned scales (2 steps, lr 0.003)" in captured.out
    job = seen["job"]
    assert job.finetune.shape == (16, job.calibration.shape[1])
    assert torch.equal(job.finetune[:job.calibration.shape[0]], job.calibration)  # one text: the calibration first
    assert len({tuple(w.tolist()) for w in job.finetune}) > job.calibration.shape[0]  # and then more
    log = json.loads((out / "quantization_log.json").read_text())
    assert log["data"]["finetune_windows"] == 16
    ft = log["runs"]["pvq:pvq-2.25"]["finetune"]
    assert ft["lr"] == 3e-3 and ft["steps"] == 2
    assert ft["windows"] == 16 and ft["held_out"] == 2 and ft["kl_held_out_before"] > 0
    for option, bad, says in [("--finetune-lr", v, "must be a positive number") for v in ("0", "-1e-3", "nan", "x")] + \
            [("--finetune-windows", v, "") for v in ("0", "-3", "2.5")]:
        with pytest.raises(SystemExit):
            main(["quantize", "--finetune", "2", f"{option}={bad}"])
        assert f"argument {option}: {says}" in capsys.readouterr().err


def test_quantize_finetune_head(tiny, capsys):
    """--finetune-head: the output head is trained too, said in the row and the log, and saved;
    it and the other fine-tuning options are refused without the fine-tuning they shape."""
    import pvq_cuda
    from pvq_cuda.apps.loading import load_model

    out = tiny / "out-ft-head"
    captured = finetune_tiny(tiny, capsys, out, "--finetune-head")
    assert "PVQ pvq-2.25 Hessian-aware + finetuned scales (2 steps, output head too)" in captured.out
    assert "finetuning row scales, gain levels, norms and the output head" in captured.err
    log = json.loads((out / "quantization_log.json").read_text())
    ft = log["runs"]["pvq:pvq-2.25"]["finetune"]
    assert ft["head"] is True
    saved = pvq_cuda.load_quantized(out).get_output_embeddings().weight
    original = load_model(str(tiny / "model"), quiet=True).model.get_output_embeddings().weight
    assert saved.shape == original.shape and not torch.equal(saved, original)
    for alone in ([], ["--finetune-blocks", "1"]):  # no end-to-end steps: refused before any work
        assert main(["quantize", "--finetune-head", *alone, "--out", str(tiny / "never")]) == 2
        assert "--finetune-head trains the head in --finetune's end-to-end steps" in capsys.readouterr().err
        assert not (tiny / "never").exists()
    # Refused even at their default values: given, they show a mistake all the same.
    for option in (["--finetune-lr", "3e-3"], ["--finetune-windows", "16"], ["--finetune-data", "generated"],
                   ["--finetune-lr", "1e-3"], ["--finetune-data", "calibration"]):
        assert main(["quantize", *option, "--out", str(tiny / "never")]) == 2
        assert f"{option[0]} shapes fine-tuning: give --finetune STEPS or --finetune-blocks EPOCHS" in \
            capsys.readouterr().err


def test_quantize_finetune_on_generated_windows(tiny, capsys, monkeypatch):
    """--finetune-data generated: the windows trained on are the unquantized model's own samples,
    as many as --finetune would draw from the text, each starting with a drawn window's first token."""
    from pvq_cuda.pipeline import finetune
    seen = spy_on_prepare(monkeypatch)
    real_finetune = finetune.finetune_scales

    def spy_finetune(model, reference, windows, **k):
        seen["windows"] = windows
        return real_finetune(model, reference, windows, **k)

    monkeypatch.setattr(finetune, "finetune_scales", spy_finetune)
    out = tiny / "out-ft-generated"
    captured = finetune_tiny(tiny, capsys, out, "--finetune-windows", "12", "--finetune-data", "generated")
    assert "PVQ pvq-2.25 Hessian-aware + finetuned scales (2 steps, on the model's own samples)" in captured.out
    drawn, trained = seen["job"].finetune, seen["windows"]
    assert trained.shape == drawn.shape == (12, seen["job"].calibration.shape[1])
    assert torch.equal(trained[:, 0], drawn[:, 0]) and not torch.equal(trained, drawn)
    ft = json.loads((out / "quantization_log.json").read_text())["runs"]["pvq:pvq-2.25"]["finetune"]
    assert ft["data"] == "generated" and ft["sampling_seconds"] > 0 and ft["windows"] == 12
    with pytest.raises(SystemExit):
        main(["quantize", "--finetune", "2", "--finetune-data", "web"])
    assert "argument --finetune-data: invalid choice" in capsys.readouterr().err


def test_finetune_windows_default():
    from argparse import Namespace

    from pvq_cuda.apps.jobs import finetune_windows
    assert finetune_windows(Namespace(nsamples=32, finetune=0, finetune_blocks=0, finetune_windows=None)) is None
    assert finetune_windows(Namespace(nsamples=32, finetune=40, finetune_blocks=0, finetune_windows=None)) == 160
    assert finetune_windows(Namespace(nsamples=32, finetune=5, finetune_blocks=0, finetune_windows=None)) == 32
    assert finetune_windows(Namespace(nsamples=32, finetune=0, finetune_blocks=2, finetune_windows=None)) == 32
    assert finetune_windows(Namespace(nsamples=32, finetune=40, finetune_blocks=0, finetune_windows=48)) == 48
    assert finetune_windows(Namespace(nsamples=8)) is None  # compare and eval have no fine-tuning options


def test_eval_on_separate_text(tiny, capsys):
    (tiny / "other.jsonl").write_text("\n".join(json.dumps({"text": TEXT[i:i + 400]}) for i in range(0, 2000, 400)))
    rc = main(["eval", "--model", str(tiny / "model"), "--eval", str(tiny / "other.jsonl"), "--seqlen", "64",
               "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and out.strip().splitlines()[-1].startswith("perplexity: ")


def test_bad_input_gets_clear_errors(tiny, tmp_path, capsys):
    rc = main(["eval", "--model", str(tmp_path / "nope"), "--device", "cpu"])
    assert rc == 2 and "--model: no such file or directory" in capsys.readouterr().err
    rc = main(["eval", "--model", str(tiny / "model"), "--eval", str(tmp_path / "missing.txt"), "--device", "cpu"])
    assert rc == 2 and "--eval: no such file" in capsys.readouterr().err
    from transformers import T5Config

    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64).save_pretrained(str(tmp_path / "t5"))
    rc = main(["eval", "--model", str(tmp_path / "t5"), "--eval", str(tiny / "text.txt"), "--device", "cpu"])
    assert rc == 2 and "not a causal language model" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    rc = main(["eval", "--model", str(tiny / "model"), "--eval", str(tmp_path / "bad.jsonl"), "--device", "cpu"])
    assert rc == 2 and "line 1 is not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--model", str(tiny / "model"), "--refine-passes", "-1"])
    assert exit_info.value.code == 2
    assert "--refine-passes: must be a non-negative integer, got -1" in capsys.readouterr().err


def test_compare_writes_table_plot_and_log(tiny, tmp_path, capsys):
    rc = main(["compare", "--model", str(tiny / "model"), "--calib", str(tiny / "text.txt"), *SMALL,
               "--config", "pvq-3.25", "--bpw", "2.5,3.5", "--refine-passes", "1", "--fp-targets", "--no-progress",
               "--out", str(tmp_path)])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0
    assert "pvq 2.5bpw (metric search, 1 refinement pass)" in captured.err  # the progress line says so
    assert "pvq 3.5bpw (1 refinement pass)" in captured.err
    stem = tmp_path / "compare_model"
    result = json.loads(stem.with_suffix(".json").read_text())
    methods = [r["method"] for r in result["results"]]
    assert methods[0] == "fp32" and "gptq-rot-int2" in methods
    assert methods[-4:] == ["pvq-datafree:pvq-3.25", "pvq:pvq-3.25", "pvq:2.5bpw", "pvq:3.5bpw"]
    allocated = result["results"][-2:]  # the Pareto curve's points: their own family in the plot
    assert {r["family"] for r in allocated} == {"PVQ Hessian-aware, allocated"}
    assert [r["bpw"] for r in allocated] == pytest.approx([2.5, 3.5], abs=0.01)
    assert all(r["perplexity"] > 0 and r["bpw"] > 0 for r in result["results"])
    assert stem.with_suffix(".png").stat().st_size > 1000 and "| GPTQ rotated INT3 g128 |" in out
    log = json.loads((tmp_path / "compare_model_log.json").read_text())
    assert len(log["runs"]["gptq-int4"]["layers"]) == 14
    assert log["runs"]["gptq-int4"]["fp_targets"] is True and log["runs"]["rtn-int4"]["fp_targets"] is False
    assert log["runs"]["pvq:pvq-3.25"]["refine_passes"] == 1 and log["runs"]["gptq-int4"]["refine_passes"] == 0
    # metric search by default below 3 bpw only (search_for), the given refinement at every rate
    assert [log["runs"][m]["metric_search"] for m in methods[-3:]] == [False, True, False]
    assert log["runs"]["pvq:2.5bpw"]["refine_passes"] == 1
    # every quantized row carries the standard error of its ratio over the 3 held-out windows
    assert all(r["ratio_se"] > 0 for r in result["results"][1:]) and result["results"][0]["ratio_se"] is None
    assert " ± " in out
    # the job's time, split: every row's evaluation is timed
    assert all(r["eval_seconds"] > 0 for r in result["results"])
    split = re.search(r"job time: (\d+) s: (\d+) s loading and tokenizing, (\d+) s in (\d+) evaluations, (-?\d+) s "
                      r"quantizing", out)
    assert split and int(split[4]) == len(methods) and int(split[5]) >= 0
    # the nine Hessian runs went together, sharing one fp pass; the data-free ones alone
    shared = {log["runs"][m].get("shared_seconds") for m in methods[1:]}
    assert len(shared - {None}) == 1 and "shared one pass of the fp model" in out
    assert "shared_seconds" in log["runs"]["gptq-rot-int2"] and "shared_seconds" not in log["runs"]["rtn-int2"]


def test_calibration_defaults(capsys):
    """quantize and compare calibrate on 32 windows by default (64 measured no better out of domain)."""
    for command, default in (("quantize", 32), ("compare", 32)):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        assert f"(default {default}:" in " ".join(capsys.readouterr().out.split())
