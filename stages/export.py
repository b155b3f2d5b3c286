"""Stage `export`: one trained drafter in the DFlash Hugging Face layout (SGLang, vLLM, z-lab DFlash), and as a
llama.cpp GGUF when serve.engine is llama.cpp."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specauf/, the one DVC hashes

from specauf.config import run_name
from specauf.stage import add_run_args, stage_main, stage_manifest_extra, stage_run
from specauf.serve.export import export_drafter
from specauf.serve.gguf_export import tokenizer_gguf


def run(params, args):
    run = run_name(*stage_run(params, "export", args.variant, args.seed))
    extra = stage_manifest_extra(params)  # the hash of no section, plus versions
    gguf = tokenizer_gguf(Path(args.target_gguf)) if params.serve.engine == "llama.cpp" else None
    export_drafter(args.drafter or f"data/drafters/{run}", args.out or f"data/export/{run}", args.target,
                   strict=args.strict, trust_remote_code=params.target.trust_remote_code, manifest_extra=extra,
                   gguf_tokenizer=gguf)


def add_args(p):
    add_run_args(p)
    p.add_argument("--drafter", help="a train output (default data/drafters/VARIANT-SEED)")
    p.add_argument("--target", default="data/target", help="the target it was trained with (lm_head rows of a draft vocabulary)")
    p.add_argument("--target-gguf", default="data/target_gguf", help="the target GGUFs (drafter.gguf copies their tokenizer)")
    p.add_argument("--out", help="default data/export/VARIANT-SEED")
    p.add_argument("--strict", metavar="ENGINE",
                   help="fail unless ENGINE runs exactly the evaluated drafter (engines: the export manifest's `engines`)")


if __name__ == "__main__":
    stage_main("export", run, add_args)
