"""English text domains for calibration and evaluation, each from a Debian package, fetched offline.

Quality measured on the calibration text alone flatters a quantizer: users calibrate on one text
and use the model on everything else. So besides the Jargon File (the default calibration text)
four more domains come from packages Debian's index ships, fetched once with ``apt-get download``
and unpacked into the cache (``pvq-cuda setup``), never into the repository:

==================  ========================================  ===============  ==================
name                what                                      package          licence
==================  ========================================  ===============  ==================
jargon              the Jargon File 4.4.7: hacker slang       jargon-text      public domain
python-docs         Python 3.11 documentation sources         python3.11-doc   PSF-2.0
                    (tutorial, how-tos, FAQs, library)
debian-reference    the Debian Reference manual (from HTML)   debian-ref.-en   GPL-2+
gnu-standards       GNU Coding Standards, GNU maintainer      gnu-standards    GFDL-1.3+
                    information (plain text)
fortunes            the fortune(6) quotations, poems and      fortunes         BSD (fortune-mod)
                    jokes (no ASCII art)
==================  ========================================  ===============  ==================

Every domain keeps its last 10 % of tokens for evaluation (``corpus.DEFAULT_HOLDOUT``), so evaluation
windows are never calibration text, whichever domains calibration mixes.
"""

from __future__ import annotations

import gzip
import html.parser
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir


def _gunzip(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def _jargon(root: Path) -> str:
    return _gunzip(root / "usr/share/doc/jargon-text/jargon.txt.gz")


# The parts of the Python docs written as prose: tutorial, how-tos, FAQs, the library reference.
_PYTHON_DOC_PARTS = ("tutorial", "howto", "faq", "library")


def _python_docs(root: Path) -> str:
    base = next((root / "usr/share/doc").glob("python3*/html/_sources"))
    files = sorted(p for part in _PYTHON_DOC_PARTS for p in (base / part).rglob("*.rst.txt"))
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


class _HTMLText(html.parser.HTMLParser):
    """The visible text of an HTML page, a paragraph per block element."""

    _BLOCKS = {"p", "div", "pre", "li", "h1", "h2", "h3", "h4", "h5", "tr", "dt", "dd", "table", "br"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)

    def text(self) -> str:
        text = re.sub(r"[ \t]+", " ", "".join(self.parts))
        return re.sub(r"\n\s*\n(\s*\n)+", "\n\n", text).strip()


def _debian_reference(root: Path) -> str:
    pages = sorted((root / "usr/share/debian-reference").glob("*.en.html"))
    out = []
    for page in pages:
        parser = _HTMLText()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        out.append(parser.text())
    return "\n\n".join(out)


def _gnu_standards(root: Path) -> str:
    docs = root / "usr/share/doc/gnu-standards"
    return "\n\n".join(_gunzip(docs / name) for name in ("standards.text.gz", "maintain.text.gz"))


_FORTUNES_SKIPPED = {"art", "ascii-art"}  # pictures, not prose


def _fortunes(root: Path) -> str:
    files = sorted(p for p in (root / "usr/share/games/fortunes").iterdir()
                   if p.is_file() and p.suffix not in (".dat", ".u8") and p.name not in _FORTUNES_SKIPPED)
    quotes = []
    for p in files:
        quotes += [q.strip() for q in re.split(r"^%$", p.read_text(encoding="utf-8", errors="replace"), flags=re.M)]
    return "\n\n".join(q for q in quotes if q)


@dataclass(frozen=True)
class Domain:
    name: str
    title: str
    package: str
    version: str | None  # pinned where Debian keeps it unchanged; None: the archive's current one
    licence: str
    extract: Callable[[Path], str]

    def describe(self, version: str | None = None) -> str:
        return f"{self.title} (Debian {self.package} {version or self.version or ''}, {self.licence})".replace(" ,", ",")


DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("jargon", "Jargon File 4.4.7", "jargon-text", "4.4.7-4.1", "public domain", _jargon),
    # python3.11-doc gets security rebuilds that Debian's archive replaces: take the current one.
    Domain("python-docs", "Python 3.11 documentation", "python3.11-doc", None, "PSF-2.0", _python_docs),
    Domain("debian-reference", "Debian Reference", "debian-reference-en", "2.100", "GPL-2+", _debian_reference),
    Domain("gnu-standards", "GNU Coding Standards and maintainer information", "gnu-standards",
           "2022.03.23-0.1", "GFDL-1.3+", _gnu_standards),
    Domain("fortunes", "fortune(6) quotations", "fortunes", "1:1.99.1-7.3", "BSD", _fortunes),
)}
CALIBRATION_DOMAIN = "jargon"
EVALUATION_DOMAINS = tuple(DOMAINS)


def domain_path(name: str) -> Path:
    return cache_dir() / "corpus" / f"{name}.txt"


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError(f"pvq-cuda setup: {cmd[0]} is not installed; the text domains come from Debian "
                           f"packages. Pass --calib/--eval with local text files instead") from e


def setup_domain(name: str, force: bool = False, quiet: bool = False) -> Path:
    """Fetch and extract domain ``name`` into the cache (once); returns its text file. Needs Debian's
    package index: when ``apt-get download`` fails and we are root, ``apt-get update`` runs once."""
    if name not in DOMAINS:
        raise ValueError(f"unknown text domain {name!r}; choose from {', '.join(DOMAINS)} or give a file path")
    d, target = DOMAINS[name], domain_path(name)
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".setup-") as tmp:
        tmpdir = Path(tmp)
        spec = f"{d.package}={d.version}" if d.version else d.package
        if not quiet:
            print(f"pvq-cuda setup: apt-get download {spec}", flush=True)
        res = _run(["apt-get", "download", spec], tmpdir)
        if res.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            _run(["apt-get", "update", "-qq"], tmpdir)
            res = _run(["apt-get", "download", spec], tmpdir)
        debs = list(tmpdir.glob(f"{d.package}_*.deb"))
        if res.returncode != 0 or not debs:
            raise RuntimeError(f"pvq-cuda setup: `apt-get download {spec}` failed ({res.stderr.strip()[-300:]}). "
                               f"Run `apt-get update` as root and retry, or pass --calib/--eval with a local text")
        res = _run(["dpkg-deb", "-x", str(debs[0]), str(tmpdir / "x")], tmpdir)
        if res.returncode != 0:
            raise RuntimeError(f"pvq-cuda setup: could not unpack {debs[0].name}: {res.stderr.strip()[-300:]}")
        text = d.extract(tmpdir / "x")
        version = debs[0].name.split("_")[1].replace("%3a", ":")
        part = tmpdir / f"{name}.txt"
        part.write_text(text, encoding="utf-8")
        (tmpdir / f"{name}.version").write_text(version)
        os.replace(tmpdir / f"{name}.version", target.with_suffix(".version"))
        os.replace(part, target)
    if not quiet:
        print(f"pvq-cuda setup: {name} at {target} ({len(text) / 1e6:.2f} MB)", flush=True)
    return target


def read_domain(name: str) -> tuple[str, str]:
    """(text, description with package, version and licence) of a domain, fetched on first use."""
    path = setup_domain(name, quiet=True)
    version_file = path.with_suffix(".version")
    version = version_file.read_text().strip() if version_file.is_file() else None
    return path.read_text(encoding="utf-8"), DOMAINS[name].describe(version)


__all__ = ["CALIBRATION_DOMAIN", "DOMAINS", "EVALUATION_DOMAINS", "Domain", "read_domain", "setup_domain"]
