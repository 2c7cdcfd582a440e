"""See what attention heads attend to: capture weights from any model, measure heads, draw them.

- :func:`capture` records every attention layer's weights ``(B, H, Lq, Lk)`` from one forward pass of a qkv
  model, a module tree with ``torch.nn.MultiheadAttention``, or a Hugging Face model.
- :mod:`qkv.analysis.measures`: per-head entropy, attention distance, mass on special tokens, punctuation,
  self / previous / next token, head-to-head Jensen-Shannon distances and an MDS map, rollout and flow,
  collapse diagnostics, head importance and ablation (how much each head matters to a loss, Michel et al.
  2019), :func:`head_table` and :func:`best_head_per_column`.
- Pictures: :func:`plot_head`, :func:`plot_grid`, :func:`plot_alignment` (matplotlib PNGs) and
  :func:`write_viewer`, one self-contained interactive HTML page for every layer and head.
- Interventions go through the named hook points of every qkv attention module (:mod:`qkv.nn.hooks`:
  ``hook_scores``, ``hook_weights``, ``hook_heads``, ...): :func:`scale_heads` (head masks, ablation,
  head importance), or any hook with :func:`qkv.nn.hooked`.
- Is attention an explanation? Token importance (how much each input token matters to an output) by
  attention, value norms, gradients and erasure (:mod:`qkv.analysis.token_importance`), the agreement of two
  such rankings (Kendall tau, top-k overlap: :mod:`qkv.analysis.rank_agreement`), the model run on
  counterfactual attention, permuted or uniform (:mod:`qkv.analysis.counterfactual_attention`), and head
  detectors for previous-token, duplicate-token and induction heads (:mod:`qkv.analysis.heads_detect`).
- Heads that follow syntax (Clark et al. 2019): :func:`syntax_heads` scores every head on relations such as
  determiner -> noun or pronoun -> antecedent (the most-attended word is the related word) against the best
  fixed offset (:mod:`qkv.analysis.syntax`), on :func:`template_sentences` (:mod:`qkv.analysis.syntax_sentences`).
- :func:`write_head_report`: all of it in one folder (viewer, PNGs, per-head table, summary), what
  ``qkv inspect "text"`` writes for a real model.
"""

from .attention_maps import AttentionMaps, capture
from .counterfactual_attention import permuted_attention, total_variation, uniform_attention
from .heads_detect import detect_heads, head_scores, heads_above, repeated_tokens
from .interventions import attention_modules, scale_heads
from .measures import (
    attention_flow,
    attention_rollout,
    best_head_per_column,
    collapse,
    head_ablation,
    head_distances,
    head_entropy,
    head_importance,
    head_table,
    mass_on,
    mds,
    mean_distance,
    offset_mass,
    punctuation_positions,
    sink_rate,
    sink_scores,
    special_positions,
)
from .rank_agreement import agreement, kendall_tau, topk_overlap
from .render import downsample_max, plot_alignment, plot_grid, plot_head
from .report import HeadReport, write_head_report
from .syntax import SyntaxScores, syntax_heads, syntax_scores, word_attention
from .syntax_sentences import Sentence, template_sentences
from .token_importance import (
    cosine_change,
    erasure,
    grad_x_input,
    integrated_gradients,
    leave_one_out,
    norm_weighted,
    token_importance_by_attention,
    token_importance_by_value_norm,
)
from .viewer import write_viewer

__all__ = [
    # capture (attention_maps)
    "AttentionMaps",
    "capture",
    # per-head and across-layer measures, head importance (measures)
    "attention_flow",
    "attention_rollout",
    "best_head_per_column",
    "collapse",
    "head_ablation",
    "head_distances",
    "head_entropy",
    "head_importance",
    "head_table",
    "mass_on",
    "mds",
    "mean_distance",
    "offset_mass",
    "punctuation_positions",
    "sink_rate",
    "sink_scores",
    "special_positions",
    # pictures and the report (render, viewer, report)
    "downsample_max",
    "plot_alignment",
    "plot_grid",
    "plot_head",
    "write_viewer",
    "HeadReport",
    "write_head_report",
    # interventions through the hook points
    "attention_modules",
    "scale_heads",
    # token importance (token_importance) and the agreement of two rankings (rank_agreement)
    "cosine_change",
    "erasure",
    "grad_x_input",
    "integrated_gradients",
    "leave_one_out",
    "norm_weighted",
    "token_importance_by_attention",
    "token_importance_by_value_norm",
    "agreement",
    "kendall_tau",
    "topk_overlap",
    # permuted and uniform attention (counterfactual_attention)
    "permuted_attention",
    "total_variation",
    "uniform_attention",
    # head detectors (heads_detect)
    "detect_heads",
    "head_scores",
    "heads_above",
    "repeated_tokens",
    # syntax heads (syntax, syntax_sentences)
    "Sentence",
    "SyntaxScores",
    "syntax_heads",
    "syntax_scores",
    "template_sentences",
    "word_attention",
]
