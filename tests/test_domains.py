"""Text domains: each package's text is extracted as promised (on synthetic package trees, offline),
and windows from several domains never put calibration text into evaluation."""

import gzip

import pytest
import torch

from pvq_cuda.apps import domains
from pvq_cuda.apps.corpus import make_domain_windows, read_source
from pvq_cuda.apps.report import domain_summary


def _gz(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.write(text)


def test_registry_describes_every_domain():
    assert domains.CALIBRATION_DOMAIN == "jargon" and set(domains.EVALUATION_DOMAINS) == set(domains.DOMAINS)
    assert len(domains.DOMAINS) >= 4
    for d in domains.DOMAINS.values():
        text = d.describe("9.9")
        assert d.package in text and d.licence in text and d.title in text


def test_extractors(tmp_path):
    _gz(tmp_path / "usr/share/doc/jargon-text/jargon.txt.gz", "hacker: one who enjoys")
    assert domains.DOMAINS["jargon"].extract(tmp_path) == "hacker: one who enjoys"

    src = tmp_path / "usr/share/doc/python3.11/html/_sources"
    for part, body in (("tutorial/intro.rst.txt", "An informal introduction"), ("library/os.rst.txt", "os module"),
                       ("c-api/skip.rst.txt", "not prose")):
        (src / part).parent.mkdir(parents=True, exist_ok=True)
        (src / part).write_text(body)
    text = domains.DOMAINS["python-docs"].extract(tmp_path)
    assert "An informal introduction" in text and "os module" in text and "not prose" not in text

    html = tmp_path / "usr/share/debian-reference/ch01.en.html"
    html.parent.mkdir(parents=True)
    html.write_text("<html><head><style>p{}</style><script>var x;</script></head><body><h1>GNU/Linux</h1>"
                    "<p>Use <code>apt</code> &amp; friends.</p><p>Second.</p></body></html>")
    assert domains.DOMAINS["debian-reference"].extract(tmp_path) == "GNU/Linux\n\nUse apt & friends.\n\nSecond."

    _gz(tmp_path / "usr/share/doc/gnu-standards/standards.text.gz", "GNU Coding Standards")
    _gz(tmp_path / "usr/share/doc/gnu-standards/maintain.text.gz", "Information for Maintainers")
    assert domains.DOMAINS["gnu-standards"].extract(tmp_path) == "GNU Coding Standards\n\nInformation for Maintainers"

    fortunes = tmp_path / "usr/share/games/fortunes"
    fortunes.mkdir(parents=True)
    (fortunes / "wisdom").write_text("First quote.\n\t-- Someone\n%\nSecond quote.\n%\n")
    (fortunes / "wisdom.dat").write_bytes(b"\0\1")
    (fortunes / "art").write_text("  /\\_/\\ \n%\n")
    assert domains.DOMAINS["fortunes"].extract(tmp_path) == "First quote.\n\t-- Someone\n\nSecond quote."


def test_unknown_source_is_named():
    with pytest.raises(ValueError, match="'shakespeare' is neither a text domain"):
        read_source("shakespeare")


def test_windows_from_several_domains_keep_evaluation_unseen():
    a, b, f = torch.arange(0, 10_000), torch.arange(20_000, 30_000), torch.arange(50_000, 50_400)
    w = make_domain_windows({"a": a, "b": b}, {"a": a, "b": b, "file": f}, nsamples=7, seqlen=100,
                            eval_windows=4, whole=frozenset({"file"}), seed=1)
    assert w.calibration.shape == (7, 100)
    from_a = int((w.calibration < 10_000).all(1).sum())
    assert (from_a, 7 - from_a) == (4, 3)  # split evenly, the first source takes the remainder
    assert int(w.calibration[w.calibration < 10_000].max()) < 9000  # a's first 90 % only
    assert int(w.calibration[w.calibration >= 20_000].max()) < 29_000
    assert int(w.evaluation["a"].min()) == 9000 and w.evaluation["a"].shape == (4, 100)
    assert int(w.evaluation["b"].min()) == 29_000
    assert w.evaluation["file"].shape == (4, 100) and int(w.evaluation["file"].min()) == 50_000  # whole
    assert w.info["sources"]["a"]["samples"] == 4 and w.info["eval_windows"] == {"a": 4, "b": 4, "file": 4}
    with pytest.raises(ValueError, match="would be evaluated whole but also calibrate"):
        make_domain_windows({"a": a}, {"a": a}, whole=frozenset({"a"}), seqlen=100)


def test_geometric_mean_and_its_standard_error():
    ref = {"x": {"perplexity": 10.0, "window_nll": [2.0, 2.4, 2.2]},
           "y": {"perplexity": 40.0, "window_nll": [3.6, 3.8, 3.7]}}
    q = {"x": {"perplexity": 11.0, "window_nll": [2.1, 2.5, 2.3]},
         "y": {"perplexity": 48.0, "window_nll": [3.8, 3.9, 4.0]}}
    ppl, ratio, se, per = domain_summary(q, ref)
    assert ppl == pytest.approx((11.0 * 48.0) ** 0.5) and ratio == pytest.approx((1.1 * 1.2) ** 0.5)
    assert per["x"]["ratio_se"] == pytest.approx(0.0, abs=1e-9) and per["y"]["ratio_se"] > 0
    want = ratio * ((per["y"]["ratio_se"] / 1.2) ** 2) ** 0.5 / 2
    assert se == pytest.approx(want)
    fp = domain_summary(ref, None)
    assert fp[1] == 1.0 and fp[2] is None and fp[0] == pytest.approx(20.0)
