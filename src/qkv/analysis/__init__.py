"""See what attention heads attend to: capture weights from any model, measure heads, draw them.

- :func:`capture` records every attention layer's weights ``(B, H, Lq, Lk)`` from one forward pass of a qkv
  model, a module tree with ``torch.nn.MultiheadAttention``, or a Hugging Face model.
- :mod:`qkv.analysis.measures`: per-head entropy, attention distance, mass on special tokens, punctuation,
  self / previous / next token, head-to-head Jensen-Shannon distances and an MDS map, rollout and flow,
  collapse diagnostics, head importance, and :func:`head_table`.
- Pictures: :func:`plot_head`, :func:`plot_grid`, :func:`plot_alignment` (matplotlib PNGs) and
  :func:`write_viewer`, one self-contained interactive HTML page for every layer and head.
- Interventions go through the named hook points of every qkv attention module (:mod:`qkv.nn.hooks`:
  ``hook_scores``, ``hook_weights``, ``hook_heads``, ...): :func:`scale_heads` (head masks, ablation,
  importance), or any hook with :func:`qkv.nn.hooked`.
- Is attention an explanation? Token importance by attention, value norms, gradients and erasure
  (:mod:`qkv.analysis.importance`), their agreement (Kendall tau, top-k overlap: :mod:`qkv.analysis.agreement`),
  the permutation test and uniform-attention baseline (:mod:`qkv.analysis.faithfulness`), and head detectors
  for previous-token, duplicate-token and induction heads (:mod:`qkv.analysis.heads_detect`).
- Heads that follow syntax (Clark et al. 2019): :func:`syntax_heads` scores every head on relations such as
  determiner -> noun or pronoun -> antecedent (the most-attended word is the related word) against the best
  fixed offset (:mod:`qkv.analysis.syntax`), on :func:`template_sentences` (:mod:`qkv.analysis.syntax_sentences`).
- :func:`write_head_report`: all of it in one folder (viewer, PNGs, per-head table, summary), what
  ``qkv inspect "text"`` writes for a real model.
"""

from .agreement import agreement, kendall_tau, topk_overlap
from .capture import AttentionMaps, capture
from .faithfulness import permuted_attention, total_variation, uniform_attention
from .heads_detect import detect_heads, head_scores, repeated_tokens, strong_heads
from .importance import (
    attention_importance,
    cosine_change,
    erasure,
    grad_x_input,
    integrated_gradients,
    leave_one_out,
    norm_weighted,
    value_norm_importance,
)
from .interventions import attention_modules, scale_heads
from .measures import (
    attention_flow,
    attention_rollout,
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
    strongest_heads,
)
from .render import downsample_max, plot_alignment, plot_grid, plot_head
from .report import HeadReport, write_head_report
from .syntax import SyntaxScores, syntax_heads, syntax_scores, word_attention
from .syntax_sentences import Sentence, template_sentences
from .viewer import write_viewer

__all__ = [
    "agreement",
    "attention_importance",
    "cosine_change",
    "detect_heads",
    "erasure",
    "grad_x_input",
    "head_scores",
    "integrated_gradients",
    "kendall_tau",
    "leave_one_out",
    "norm_weighted",
    "permuted_attention",
    "repeated_tokens",
    "strong_heads",
    "topk_overlap",
    "total_variation",
    "uniform_attention",
    "value_norm_importance",
    "AttentionMaps",
    "HeadReport",
    "attention_flow",
    "attention_modules",
    "attention_rollout",
    "capture",
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
    "scale_heads",
    "sink_rate",
    "sink_scores",
    "special_positions",
    "strongest_heads",
    "downsample_max",
    "plot_alignment",
    "plot_grid",
    "plot_head",
    "write_head_report",
    "write_viewer",
    "Sentence",
    "SyntaxScores",
    "syntax_heads",
    "syntax_scores",
    "template_sentences",
    "word_attention",
]
