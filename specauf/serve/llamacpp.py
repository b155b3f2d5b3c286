"""llama.cpp's tools, built from a pinned PyPI sdist, and decoding with them.

Why an sdist: llama.cpp's DFlash support (`--spec-type draft-dflash`, src/models/dflash.cpp) is
newer than any llama.cpp on Debian, and the machine reaches only package registries. The sdist of
llama-cpp-python vendors a whole llama.cpp tree (SDIST_COMMIT); its own build makes only the
shared library, so we build the tools from the vendored tree with cmake, CPU only, and cache the
build per machine (home()): a second install checks the stamp and builds nothing. The same tree's
gguf-py writes our GGUF drafters (import_gguf) and its convert_hf_to_gguf.py converts a
transformers target (convert_target): writer, converter and runtime are one commit.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from specauf.artifacts import read_json, sha256_file, write_json
from specauf.errors import UserError

log = logging.getLogger("specauf")

SDIST = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_COMMIT = "0c1e570"  # llama.cpp as vendored in that sdist (2026-10-01)
TOOLS = ("llama-speculative-simple", "llama-completion")  # what the serve stage and the tests run
SERVER = "llama-server"  # the README's serving command; built by `specauf llamacpp install --server`
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_APP=OFF",
               # exact speculative decoding: llamafile's sgemm serves only multi-token batches (a
               # verified block), ggml's own dot products a one-token step, and their float sums
               # differ; a repacked kernel likewise. Off, every row of a matmul is the same dot
               # product at any batch size (docs/benchmarks.md, "llama.cpp exactness").
               "-DGGML_LLAMAFILE=OFF", "-DGGML_CPU_REPACK=OFF")
# --no-repack: ggml's CPU "extra buffer" repacking (AMX and AVX512 matmul kernels) crashed the
# Q4_1 target on an AMX Xeon here (segfault in ggml_backend_amx_mul_mat); the plain kernels run
# everywhere (and a llama.cpp built elsewhere, with repacking, is kept off it). -fa off: llama.cpp's
# CPU flash attention computes a one-token step and a verified block in different float orders,
# enough to flip greedy at a near-tie. With both and CMAKE_FLAGS' kernels, every speculative output
# equals plain greedy (docs/benchmarks.md, "llama.cpp exactness"). Every command we run and print
# carries these flags.
RUN_FLAGS = ("--no-repack", "-fa", "off")
# How many tokens a cycle drafts, per spec type (llama.cpp 0c1e570 names it per method).
NGRAM_N_MAX = {"ngram-simple": ("--spec-ngram-simple-size-m",), "ngram-map-k": ("--spec-ngram-map-k-size-m",),
               "ngram-mod": ("--spec-ngram-mod-n-max",)}
BUILD_PACKAGES = {"cmake": "cmake", "g++": "g++", "ninja": "ninja-build"}


def home() -> Path:
    """Where the sdist is unpacked and built: $SPECAUF_LLAMACPP_HOME, or a per-user cache named by
    commit and hash (a new pin builds beside the old one)."""
    env = os.environ.get("SPECAUF_LLAMACPP_HOME")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "spec-auf" / f"llama.cpp-{SDIST_COMMIT}-{SDIST_SHA256[:12]}"


def source_dir() -> Path:
    return home() / "src" / SDIST_FILE.removesuffix(".tar.gz") / "vendor" / "llama.cpp"


def _stamp() -> dict:
    path = home() / "stamp.json"
    return read_json(path) if path.is_file() else {}


def installed(server: bool = False) -> bool:
    want = set(TOOLS) | ({SERVER} if server else set())
    return _built_as_pinned(_stamp()) and want <= set(_stamp().get("tools", [])) \
        and all((home() / "build" / "bin" / t).is_file() for t in want)


def _built_as_pinned(stamp: dict) -> bool:
    """The build is of the pinned sdist with today's CMAKE_FLAGS (a build with other kernels is
    not the llama.cpp whose exactness was measured: install rebuilds it)."""
    return stamp.get("sdist_sha256") == SDIST_SHA256 and stamp.get("cmake_flags") == list(CMAKE_FLAGS)


def _build_tools_present() -> None:
    """cmake, g++ and ninja, from Debian's packages when missing (as root), else a one-line error."""
    missing = [pkg for exe, pkg in BUILD_PACKAGES.items() if shutil.which(exe) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise UserError(f"building llama.cpp needs {', '.join(missing)} (Debian packages): install them and rerun")
    log.info("llama.cpp: installing %s with apt-get", ", ".join(missing))
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True)


def _download(dest: Path) -> Path:
    """The pinned sdist from the package index pip uses, checked against SDIST_SHA256."""
    dest.mkdir(parents=True, exist_ok=True)
    file = dest / SDIST_FILE
    if not file.is_file():
        log.info("llama.cpp: downloading %s", SDIST)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        SDIST, "-d", str(dest)], check=True)
    got = sha256_file(file)
    if got != SDIST_SHA256:
        file.unlink()
        raise UserError(f"{file}: sha256 {got} is not the pinned {SDIST_SHA256} (deleted; rerun to download again)")
    return file


def install(server: bool = False) -> Path:
    """Build TOOLS (and SERVER) once per machine; return the folder holding the binaries."""
    bin_dir = home() / "build" / "bin"
    if installed(server):
        log.info("llama.cpp %s: tools in %s (cached)", SDIST_COMMIT, bin_dir)
        return bin_dir
    _build_tools_present()
    root = home()
    file = _download(root / "dl")
    src = source_dir()
    if not (src / "CMakeLists.txt").is_file():
        log.info("llama.cpp: unpacking %s", file.name)
        shutil.rmtree(root / "src", ignore_errors=True)  # ours: made by an earlier, interrupted unpack
        with tarfile.open(file) as tar:
            tar.extractall(root / "src", filter="data")
    tools = sorted(set(TOOLS) | ({SERVER} if server else set()) | set(_stamp().get("tools", [])))
    build = root / "build"
    log.info("llama.cpp: building %s (CPU only; several CPU minutes, once)", ", ".join(tools))
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", *CMAKE_FLAGS], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1), "--target", *tools], check=True)
    write_json(root / "stamp.json", {"sdist": SDIST, "sdist_sha256": SDIST_SHA256, "commit": SDIST_COMMIT,
                                     "cmake_flags": list(CMAKE_FLAGS), "tools": tools})
    log.info("llama.cpp: built %s in %s", ", ".join(tools), bin_dir)
    return bin_dir


def tool(name: str) -> Path:
    """A built tool's path, or a one-line error saying how to build it."""
    path = home() / "build" / "bin" / name
    if not path.is_file() or not _built_as_pinned(_stamp()):
        flag = " --server" if name == SERVER else ""
        raise UserError(f"llama.cpp tool {name} is not built in {home()} (or not with today's cmake flags): "
                        f"run `specauf llamacpp install{flag}` "
                        "(or `bash scripts/run.sh llamacpp`)")
    return path


@contextmanager
def gguf_module():
    """The sdist's gguf-py as `gguf`, for the duration of the block.

    transformers reads GGUF targets with the `gguf` wheel, which predates DFlash; the writer must
    be the runtime's own, so it is imported from the source tree and the wheel's modules are put
    back afterwards."""
    path = str(source_dir() / "gguf-py")
    if not Path(path, "gguf", "__init__.py").is_file():
        raise UserError(f"{path}: no gguf-py: run `specauf llamacpp install`")
    saved = {k: v for k, v in sys.modules.items() if k == "gguf" or k.startswith("gguf.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, path)
    try:
        import gguf

        yield gguf
    finally:
        sys.path.remove(path)
        for k in [k for k in sys.modules if k == "gguf" or k.startswith("gguf.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def convert_target(model_dir: Path, out_file: Path, outtype: str = "f32") -> None:
    """A transformers target folder -> GGUF, with the sdist's own converter (run, not copied)."""
    script = source_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise UserError(f"{script}: missing: run `specauf llamacpp install`")
    env = {**os.environ, "PYTHONPATH": str(source_dir() / "gguf-py"), "NO_LOCAL_GGUF": ""}
    res = subprocess.run([sys.executable, str(script), str(model_dir), "--outfile", str(out_file), "--outtype", outtype],
                         env=env, capture_output=True, text=True, errors="replace")
    if res.returncode != 0:
        tail = "\n".join(res.stderr.strip().splitlines()[-6:])
        raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed on {model_dir} (exit {res.returncode}):\n{tail}")


@dataclass
class Decoded:
    """One llama.cpp generation: the continuation, its speed and, when speculative, every cycle's
    accepted guesses (from its coloured output, in no order); with -v, `logged` holds each cycle's
    (accepted, drafted) as llama-speculative-simple logs them, in order."""
    text: str
    tokens: int
    tokens_per_s: float
    accepted: list[int] = field(default_factory=list)
    logged: list[tuple[int, int]] = field(default_factory=list)


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    """Run a tool (argv only, never a shell); a failure keeps the tool's last words."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace")
    if res.returncode != 0:
        tail = "\n".join(res.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"{what} failed (exit {res.returncode}): {' '.join(map(str, cmd[:3]))} ...\n{tail}")
    return res


# KV caches in f32 (llama.cpp's default is f16): with an f32 target GGUF, llama.cpp then computes
# what our fp32 target computes, near-ties included; the serve stage's quantised target keeps the
# default a user gets.
F32_CACHE = ("-ctk", "f32", "-ctv", "f32")
F32_DRAFT_CACHE = ("-ctkd", "f32", "-ctvd", "f32")


def _common(model: Path, prompt: str, n: int, threads: int, f32_cache: bool = True) -> list[str]:
    return ["-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0", "--seed", "0", "-t", str(threads),
            "-tb", str(threads), "-c", "4096", *RUN_FLAGS, *(F32_CACHE if f32_cache else ())]


def decode_plain(model: Path, prompt: str, n: int, threads: int = 1, f32_cache: bool = True) -> Decoded:
    """Greedy decoding with llama-completion (raw prompt text, special tokens parsed)."""
    res = _run([tool("llama-completion"), *_common(model, prompt, n, threads, f32_cache), "-no-cnv", "--no-display-prompt"],
               "llama-completion")
    m = re.search(r"eval time =\s*([\d.]+) ms /\s*(\d+) runs", res.stderr.split("prompt eval time")[-1])
    if m is None:
        raise RuntimeError(f"llama-completion printed no eval time:\n{res.stderr[-2000:]}")
    ms, runs = float(m.group(1)), int(m.group(2))
    # stdout: the continuation, " [end of text]\n" when it stopped at EOS, then "\n\n"
    text = res.stdout.removesuffix("\n\n").removesuffix(" [end of text]\n")
    return Decoded(text=text, tokens=runs, tokens_per_s=runs / (ms / 1000) if ms else float("nan"))


def decode_speculative(model: Path, draft: Path | None, prompt: str, n: int, n_max: int, threads: int = 1,
                       spec_type: str = "draft-dflash", verbose: bool = False, f32_cache: bool = True) -> Decoded:
    """Speculative greedy decoding with llama-speculative-simple (draft: a GGUF drafter, or None
    for an n-gram spec_type). It emits n+1 to n+n_max+1 tokens (it stops after the cycle passing
    n). One run gives text, speed and cycles: the cycles are read from its coloured output
    (cycles_from_colour), not from -v, so the timed run is the counted one. `verbose` adds -v's
    per-cycle log (`logged`: the tests check the colour reading against it)."""
    cmd = [tool("llama-speculative-simple"), *_common(model, prompt, n, threads, f32_cache), "--spec-type", spec_type,
           *NGRAM_N_MAX.get(spec_type, ("--spec-draft-n-max",)), str(n_max), "--color", "on"]
    if draft is not None:
        cmd += ["-md", str(draft), "-td", str(threads), "-tbd", str(threads), *(F32_DRAFT_CACHE if f32_cache else ())]
    if verbose:
        cmd += ["-v"]
    res = _run(cmd, "llama-speculative-simple")
    log_text = res.stderr + res.stdout
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log_text)
    accept = re.search(r"n_accept\s+=\s+(\d+)", log_text)
    if m is None or accept is None:
        raise RuntimeError(f"llama-speculative-simple printed no decode time or n_accept:\n{res.stderr[-2000:]}")
    tokens, secs = int(m.group(1)), float(m.group(2))
    # stdout: "\n\n" + the prompt's pieces + the continuation + "\n\n\n\n"
    head = "\n\n" + prompt
    if not res.stdout.startswith(head):
        raise RuntimeError(f"llama-speculative-simple did not echo the prompt as given: {res.stdout[:200]!r}")
    body = res.stdout[len(head):].removesuffix("\n\n\n\n")
    logged = [(int(a), int(d)) for a, d in re.findall(r"accepted (\d+)/(\d+) draft tokens", log_text)]
    return Decoded(text=body.replace(COLOUR_ON, "").replace(COLOUR_OFF, ""), tokens=tokens,
                   tokens_per_s=tokens / secs if secs else float("nan"),
                   accepted=cycles_from_colour(body, tokens, int(accept.group(1))), logged=logged)


# `--color on`: llama-speculative-simple prints each cycle's accepted guesses between these codes
# and the cycle's own target token (the one it adds after the guesses) without them.
COLOUR_ON, COLOUR_OFF = "\x1b[36m", "\x1b[37m"
_COLOURED = re.compile(f"({re.escape(COLOUR_ON)}.*?{re.escape(COLOUR_OFF)})", re.S)


def cycles_from_colour(body: str, n_predict: int, n_accept: int) -> list[int]:
    """Accepted guesses per cycle (a multiset, in no order) from a coloured continuation and the
    run's n_predict / n_accept. Every cycle emits its accepted guesses (coloured) and one target
    token (plain), so cycles = n_predict - n_accept, each maximal coloured run closed by a plain
    token is one cycle's accepted count, and the cycles without a coloured run accepted nothing
    (their plain tokens run together in the text: only their number is known). The last cycle
    stops printing at an end-of-generation token, so it takes whatever n_accept has left."""
    runs, run = [], 0
    for part in _COLOURED.split(body):
        if part.startswith(COLOUR_ON):
            run += 1
        elif part and run:
            runs.append(run)
            run = 0
    left = n_accept - sum(runs)
    if left < run:
        raise RuntimeError(f"llama.cpp's coloured output shows {sum(runs) + run} accepted guesses, its n_accept {n_accept}")
    if left:
        runs.append(left)
    cycles = n_predict - n_accept
    if len(runs) > cycles:
        raise RuntimeError(f"llama.cpp's coloured output shows {len(runs)} cycles with accepted guesses, "
                           f"more than its {cycles} cycles (n_predict {n_predict} - n_accept {n_accept})")
    return runs + [0] * (cycles - len(runs))
