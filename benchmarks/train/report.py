"""Reports of the training-throughput benchmark: console lines, markdown tables and the JSON run
records (each ``ours`` variant paired with the HF baseline of its length)."""

from __future__ import annotations

import statistics


def summary_line(r: dict) -> str:
    """One console line per result: throughput, MFU, memory, phases and the first loss."""
    head = f"{r['variant']:40s} seq {r['seq_len']:6d} {r['status']:7s}"
    if r["status"] != "ok":
        pred = f" (predicted {r['predicted_peak_gib']:.1f} GiB)" if r.get("predicted_peak_gib") is not None else ""
        return f"{head} {r.get('error', '')}{pred}"
    peak = f"{r['peak_gib']:5.1f}" if r.get("peak_gib") is not None else "   - "
    if r.get("predicted_peak_gib") is not None:
        peak += f" (predicted {r['predicted_peak_gib']:.1f})"
    ph = " ".join(f"{k} {v:.0f}" for k, v in (r.get("phases_ms") or {}).items() if v is not None)
    flat = "" if r.get("flat_adamw_active") is None else f"  flat AdamW {'on' if r['flat_adamw_active'] else 'OFF'}"
    return (f"{head} {r['tokens_per_s']:9.0f} tok/s  mfu {100 * r['mfu']:5.1f}%  peak {peak} GiB  "
            f"step {r['step_s'] * 1e3:7.1f} ms  {ph}  loss {r['losses'][0]:.3f}{flat}")


def kernel_lines(k: dict) -> list[str]:
    """Console lines of a profiled step (``prof``): kernel categories, GPU busy share, idle gaps,
    top kernels and, where recorded, host ops and ops by input shape."""
    cats = ", ".join(f"{c} {ms:.1f}" for c, ms in k["categories_ms"].items())
    lines = [f"#   kernels {k['total_ms']:.1f} ms: {cats}",
             f"#   GPU busy {100 * k['busy']:.0f}% of the profiled step's {k['wall_ms']:.0f} ms"]
    idle = k.get("idle") or {}
    if idle:
        lines.append(f"#   GPU idle {idle['idle_ms']:.1f} ms in {idle['gaps']} gaps over {idle['span_ms']:.0f} ms; "
                     f"by tenth of the step: {idle['idle_by_tenth_ms']}")
        lines += [f"#     gap {g:7.3f} ms at {at:6.1f} ms  after {before[:50]}  before {after[:50]}"
                  for g, at, before, after in idle["largest"][:12]]
    lines += [f"#     {ms:8.2f} ms  {name[:110]}" for name, ms in k["top"][:12]]
    lines += [f"#     host {ms:8.2f} ms  x{count:<5d} {name[:100]}" for name, ms, count in k.get("host_top") or []]
    lines += [f"#     op {ms:8.2f} ms  x{count:<5d} {name[:60]} {shp[:150]}"
              for name, shp, ms, count in k.get("ops_top") or []]
    return lines


def _baseline_for(r: dict, hf: dict) -> dict:
    """The baseline an ``ours`` result is compared with: hf-strong at ours' optimizer precision
    (fp32 master weights and Adam state), with gradient checkpointing when ours recomputes anything
    (without when it does not), then the other checkpointing choice, then hf-strong with bf16 Adam,
    then the naive ``hf``; a run that did not finish comes after every one that did."""
    cfg = r.get("config") or {}
    rc = cfg.get("recompute_vision", "none") != "none" or cfg.get("recompute_llm", "none") != "none"

    def rank(b: dict) -> tuple:
        c = b.get("config") or {}
        return (b.get("status") != "ok", b["side"] != "hf-strong", not c.get("master_fp32", False),
                bool(c.get("grad_ckpt")) != rc, not c.get("doc_mask", True), b["variant"])
    runs = sorted((b for (seq, _), b in hf.items() if seq == r["seq_len"]), key=rank)
    return runs[0] if runs else {}


def _side(prefix: str, r: dict) -> dict:
    ok = r.get("status") == "ok"
    return {f"{prefix}_{k}": (r.get(k) if ok else None)
            for k in ("tokens_per_s", "mfu", "mfu_measured_peak", "peak_gib", "phases_ms")}


def pair_runs(results: list[dict], date: str, command: str, commit: str) -> list[dict]:
    """One run record per ours-variant result, paired with a baseline of its seq_len (``baseline``:
    ``hf-strong`` or ``hf-naive``; :func:`_baseline_for`); ``baselines`` lists every baseline run at
    that length. ``config`` and ``hf_config`` are the two variants' resolved options, and the
    recompute settings of both sides are copied to the top level."""
    from benchmarks.train.variants import baseline_label

    runs = []
    hf = {(r["seq_len"], r["variant"]): r for r in results if r["side"] != "ours"}
    for r in results:
        if r["side"] != "ours":
            continue
        base = _baseline_for(r, hf)
        alt = hf.get((r["seq_len"], "hf+nomask"), {})
        ok = r["status"] == "ok"
        hok = base.get("status") == "ok"
        cfg, hcfg = r.get("config") or {}, base.get("config") or {}
        run = dict(device=r["device"], date=date, preset=r["preset"], seq_len=r["seq_len"], world=r["world"],
                   tp=r["tp"], dp=r["dp"], ours_variant=r["variant"], hf_variant=base.get("variant"),
                   baseline=baseline_label(base["side"]) if base else None,
                   baseline_precision=hcfg.get("baseline_precision"),
                   ours_precision=cfg.get("precision", "fp32-master"),
                   ours_recompute={"vision": cfg.get("recompute_vision"), "llm": cfg.get("recompute_llm"),
                                   "llm_layers": cfg.get("recompute_llm_layers"),
                                   "offload_vit": cfg.get("offload_vit")},
                   baseline_recompute=hcfg.get("recompute"),
                   ours_status=r["status"], hf_status=base.get("status", "not_run"),
                   **_side("ours", r), **_side("hf", base),
                   ours_predicted_peak_gib=r.get("predicted_peak_gib"),
                   hf_nomask_tokens_per_s=alt.get("tokens_per_s") if alt.get("status") == "ok" else None,
                   hf_nomask_mfu=alt.get("mfu") if alt.get("status") == "ok" else None,
                   hf_nomask_peak_gib=alt.get("peak_gib") if alt.get("status") == "ok" else None,
                   speedup_vs_hf=(r["tokens_per_s"] / base["tokens_per_s"]) if ok and hok else None,
                   baselines={name: dict(status=b["status"], tokens_per_s=b.get("tokens_per_s"),
                                         peak_gib=b.get("peak_gib"),
                                         precision=(b.get("config") or {}).get("baseline_precision"))
                              for (seq, name), b in hf.items() if seq == r["seq_len"]},
                   ours_error=r.get("error"), hf_error=base.get("error"),
                   matmul_peak_tflops=r.get("matmul_peak_tflops"), torch=r.get("torch"), command=command,
                   commit=commit, config=r.get("config"), hf_config=base.get("config"))
        runs.append(run)
    for (seq, name), h in hf.items():  # baseline-only seq lens still get a record
        if not any(x["seq_len"] == seq for x in runs) and "+" not in name:
            hc = h.get("config") or {}
            runs.append(dict(device=h["device"], date=date, preset=h["preset"], seq_len=seq, world=1, tp=1, dp=1,
                             ours_variant=None, hf_variant=name, baseline=baseline_label(h["side"]),
                             baseline_precision=hc.get("baseline_precision"), baseline_recompute=hc.get("recompute"),
                             ours_status="not_run", hf_status=h["status"],
                             ours_tokens_per_s=None, hf_tokens_per_s=h.get("tokens_per_s"), ours_mfu=None,
                             hf_mfu=h.get("mfu"), ours_peak_gib=None, hf_peak_gib=h.get("peak_gib"),
                             command=command, commit=commit, config=None, hf_config=h.get("config")))
    return runs


def markdown(results: list[dict]) -> str:
    """One row per result; with several layouts, scaling efficiency = tokens/s per GPU over the
    same variant's on one GPU. ``prof`` variants add the profiled step's GPU kernel time."""
    single = {(r["seq_len"], r["variant"]): r for r in results
              if r.get("world", 1) == 1 and r["status"] == "ok"}
    lines = ["| variant | GPUs x TP | seq | status | tokens/s | tokens/s/GPU | scaling eff. | MFU (989) | "
             "MFU (measured peak) | peak GiB | predicted GiB | step ms | ViT f/b | LLM f/b | loss f/b | optim | other | "
             "GPU kernel ms |",
             "|" + "---|" * 18]
    f = lambda x, d=0: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    for r in results:
        ph = r.get("phases_ms") or {}
        ok = r["status"] == "ok"
        one = single.get((r["seq_len"], r["variant"]))
        eff = (r["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]) if ok and one else None
        lines.append(
            f"| {r['variant']} | {r.get('world', 1)}x{r.get('tp', 1)} | {r['seq_len']} | {r['status']} | "
            f"{f(r.get('tokens_per_s')) if ok else '-'} | {f(r.get('tokens_per_s_per_gpu')) if ok else '-'} | "
            f"{f(100 * eff, 0) + '%' if eff else '-'} | "
            f"{f(100 * r['mfu'], 1) + '%' if ok else '-'} | "
            f"{f(100 * r['mfu_measured_peak'], 1) + '%' if ok and r.get('mfu_measured_peak') else '-'} | "
            f"{f(r.get('peak_gib'), 1)} | {f(r.get('predicted_peak_gib'), 1)} | "
            f"{f(r['step_s'] * 1e3, 1) if ok else '-'} | "
            f"{f(ph.get('vit_fwd'))}/{f(ph.get('vit_bwd'))} | {f(ph.get('llm_fwd'))}/{f(ph.get('llm_bwd'))} | "
            f"{f(ph.get('loss_fwd'))}/{f(ph.get('loss_bwd'))} | {f(ph.get('optimizer'))} | {f(ph.get('other'))} | "
            # GPU time of the profiled step (``prof``): unlike wall time, not moved by host stalls
            f"{f((r.get('kernels') or {}).get('total_ms'), 1)} |")
    return "\n".join(lines) + "\n"


def median_table(results: list[dict]) -> str:
    """Per (layout, seq, variant) over its repeated runs: median, min and max tokens/s, median MFU
    and, for profiled variants, the median GPU kernel time."""
    groups: dict = {}
    for r in results:
        if r["status"] == "ok":
            groups.setdefault((r.get("world", 1), r.get("tp", 1), r["seq_len"], r["variant"]), []).append(r)
    lines = ["| variant | GPUs x TP | seq | runs | median tokens/s | min-max | median MFU | median GPU kernel ms |",
             "|" + "---|" * 8]
    for (world, tp, seq, variant), rs in groups.items():
        tps = [r["tokens_per_s"] for r in rs]
        kern = [r["kernels"]["total_ms"] for r in rs if r.get("kernels")]
        lines.append(f"| {variant} | {world}x{tp} | {seq} | {len(rs)} | {statistics.median(tps):.0f} | "
                     f"{min(tps):.0f}-{max(tps):.0f} | {100 * statistics.median(r['mfu'] for r in rs):.1f}% | "
                     f"{f'{statistics.median(kern):.1f}' if kern else '-'} |")
    return "\n".join(lines) + "\n"
