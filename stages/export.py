"""Stage `export`: one trained drafter in the DFlash Hugging Face layout (SGLang, vLLM, z-lab DFlash)."""
from specauf.cli import stage_main, stage_manifest_extra
from specauf.export import export_drafter


def run(params, args):
    extra = stage_manifest_extra(params)  # reads no params: the hash of none, plus versions
    export_drafter(args.drafter, args.out, args.target, strict=args.strict, manifest_extra=extra)


def add_args(p):
    p.add_argument("--drafter", required=True, help="a train output, e.g. data/drafters/auf")
    p.add_argument("--target", default="data/target", help="the target it was trained with (lm_head rows of a draft vocabulary)")
    p.add_argument("--out", required=True)
    p.add_argument("--strict", action="store_true", help="fail unless the engines run exactly the evaluated drafter")


if __name__ == "__main__":
    stage_main("export", run, add_args)
