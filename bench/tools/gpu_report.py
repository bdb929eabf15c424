"""The GPU check's printed table (bench/tools/gpu_check.py writes the same figures to gpu_check.json)."""

from __future__ import annotations


def _f(value, fmt: str, none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def train_table(rows: list[dict]) -> list[str]:
    lines = [f"{'network':<11} {'setting':<24} {'batch':>5} {'img/s':>9} {'TFLOP/s':>8} {'util':>6} {'step ms':>8} "
             f"{'data %':>7} {'peak GiB':>8}"]
    for r in rows:
        if "images_per_s" not in r:
            lines.append(f"{r['network']:<11} {r['setting']:<24} {'':>5}  {r.get('error') or 'not run'}")
            continue
        util = "n/a" if r["utilization"] is None else f"{100 * r['utilization']:.0f}%"  # n/a: no peak for the device
        lines.append(f"{r['network']:<11} {r['setting']:<24} {r['batch']:>5} {r['images_per_s']:>9.1f} "
                     f"{r['tflops']:>8.1f} {util:>6} {r['step_ms']:>8.1f} {100 * r['data_fraction']:>6.1f}% "
                     f"{_f(r['peak_gib'], '.2f'):>8}")
    return lines


def _sampling(rows: list[dict]) -> str:
    r = rows[0]
    if "images_per_s" not in r:
        return f"ADM sampling, bf16: failed: {r.get('error')}"
    util = "" if r["utilization"] is None else f", {100 * r['utilization']:.0f}% of peak"
    return (f"{r['network']} sampling at {r['resolution']} px, bf16, DDIM {r['steps']} steps, batch {r['batch']}"
            + (f" (halved to {r['halved_to']})" if r.get("halved_to") else "")
            + f": {r['images_per_s']} images/s, {r['network_evals_per_s']} network evaluations/s, "
            f"{r['tflops']} TFLOP/s{util}, peak {_f(r['peak_gib'], '.2f')} GiB")


def _inception(r: dict) -> str:
    if "images_per_s" not in r:
        return f"Inception: failed: {r.get('error')}"
    return (f"Inception at batch {r['batch']}: {r['images_per_s']} images/s (forward), {r['end_to_end_images_per_s']} "
            f"images/s with the resize of 32 px images in {r['resize_workers']} CPU threads")


def _imagenet(im: dict) -> str:
    if "error" in im:
        return f"ImageNet path: failed: {im['error']}"
    fid = im["fid"] if im["fid"] is None else round(im["fid"], 1)
    return (f"ImageNet path: {im['arch']} at {im['resolution']} px, class-conditional, {im['processes']} processes "
            f"({im['backend']} on {im['device']}), memory-mapped {im['memory_mapped']}, train {im['train_s']} s, "
            f"evaluation on both ranks {im['eval_s']} s (FID-{im['eval_images']} {fid}, {im['sample_precision']}): "
            f"{im['state']}, {im.get('part_s')} s in all")


def _nccl(r: dict) -> str:
    if "skipped" in r or "error" in r:
        return f"NCCL slice: {r.get('skipped') or 'failed: ' + str(r.get('error'))}"
    return (f"NCCL slice: all-reduce of {r['gigabytes']} GB over {r['processes']} GPUs in {r['all_reduce_ms']} ms, "
            f"bus bandwidth {r['bus_gb_per_s']} GB/s")


def _paper_run(pr: dict) -> str:
    if "error" in pr:
        return f"paper-cifar10-shaped run: failed: {pr['error']}"
    fid = pr["fid"] if pr["fid"] is None else round(pr["fid"], 2)
    return (f"paper-cifar10-shaped run: {pr['iters']} it x batch {pr['batch']} in {pr['train_s']} s "
            f"({pr['train_images_per_s']} img/s), FID-{pr['fid_images']} = {fid} (generated data: a plumbing check, "
            f"not a quality number) in {pr['eval_s']} s")


def _verdict(flag) -> str:
    return {True: "met", False: "NOT met", None: "not applicable"}[flag]


def render(result: dict) -> str:
    env, c = result["environment"], result["checks"]
    lines = [f"GPU check on {env.get('gpu') or env['device']} (torch {env['torch']}, CUDA {env['cuda']})"
             + (" -- quick, toy sizes" if result["quick"] else ""), ""]
    lines += train_table(result["throughput"])
    lines += ["", f"fast path / fp32 eager (ddpm): {c['fast_over_eager']}x (target >= 2 on a GPU: "
              f"{_verdict(c['fast_over_eager_at_least_2x'])}); channels_last on / off: ddpm "
              f"{c['channels_last_on_over_off_ddpm']}x, adm {c['channels_last_on_over_off_adm']}x (on where above 1: "
              "bench/core/runtime.py CHANNELS_LAST_CUDA)",
              f"data wait, share of a step (target < 5%): ddpm {c['data_fraction_ddpm']} "
              f"({_verdict(c['data_under_5_percent_ddpm'])}), adm {c['data_fraction_adm']} "
              f"({_verdict(c['data_under_5_percent_adm'])})",
              _sampling(result["sampling"]), _inception(result["inception"]), _imagenet(result["imagenet"]),
              _nccl(result["nccl"]), _paper_run(result["paper_run"])]
    ct = result["cuda_tests"]
    lines.append("CUDA tests: " + (ct["skipped"] if "skipped" in ct else f"{ct['summary']} (exit {ct['returncode']})"))
    cut = result.get("cut") or []
    lines.append(f"total: {result['seconds']} s of a {result['budget_s']:.0f} s budget (estimate {result['estimate_s']} s)"
                 + (f"; cut or skipped at their guards: {', '.join(cut)}" if cut else ""))
    return "\n".join(lines)
