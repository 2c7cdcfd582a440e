"""``qkv train molecule``: attention over the atoms of a molecule, grounded in substructures.

Label (SMARTS, RDKit's ``GetSubstructMatches``): a molecule is positive when a benzene ring carries a primary
aromatic amine para to a nitro group or a carboxylic acid (the push-pull pattern of 4-nitroaniline and of
4-aminobenzoic acid)::

    [NX3;H2]-c1ccc(-[N+](=O)[O-])cc1    or    [NX3;H2]-c1ccc(-C(=O)[OX2H1])cc1

The atoms those patterns match are the ground truth for *where* the model should look.

Molecules come from a seeded grammar (:func:`generate`): two or three benzene "arms" joined by a linker (a
bond, an amide, an ether, a sulfonamide, a piperazine, a triazine, ...), each arm carrying two groups on a
pair of para positions, taken from a list of common substituents, plus the amine, nitro and acid groups.
RDKit joins the pieces (``molzip``) and sanitises every molecule. Half of the molecules are positive; 70% of
the negatives carry the amine and the acceptor on two *different* arms, each para to another group, so that
every radius-2 environment of a positive occurs in negatives too: only the relation (both on one ring,
para) tells the classes apart, and it spans 7 bonds, wider than a radius-2 Morgan fingerprint (ECFP4) sees.
The other negatives have the two groups ortho or meta on one ring, or only one of them.

Model (:class:`MoleculeTransformer`): atoms are the tokens (element, charge, aromaticity, hydrogens, degree
embedded and summed, as OGB's atom encoder); bonds enter every attention layer as a learned per-head bias by
shortest-path distance, with the bond type for bonded pairs (Graphormer's spatial encoding, Ying et al.
2021), so that one layer can reach any atom and knows how far it is; pre-norm :class:`qkv.nn.TransformerBlock`
s; a learned query reads the molecule out by attention over the atoms (:class:`qkv.nn.MultiHeadAttention`),
and its weights (captured through qkv's ``hook_weights`` points, :func:`qkv.analysis.capture`) say which
atoms the prediction was read from.

Baselines without attention: (a) a Morgan fingerprint (radius 2, 2048 bits: ECFP4) with a logistic regression
(scikit-learn; radius 3 is printed too); (b) the same network with every attention replaced by fixed weights:
each layer averages the atom's bonded neighbours (and itself) uniformly, a graph convolution, and the readout
is the mean over atoms.

Grounding, on the positive held-out molecules: the share of attention rollout (Abnar & Zuidema 2020: the
readout's weights, mean over its heads, carried back through the self-attention layers) that lands on the
matched atoms, against chance (the matched atoms' share of the molecule's atoms); the fraction of molecules
whose most-attended atom is a matched one (its chance is the same); and both for the readout's own weights.
Picture: held-out molecules drawn by RDKit (a positive with a nitro group, one with an acid, a decoy) with
their atoms shaded by the rollout and the matched bonds drawn in blue.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...analysis import attention_rollout, capture
from ...nn import MultiHeadAttention, TransformerBlock
from ...scores import bias
from .common import TaskResult, fit

__all__ = [
    "ACCEPTORS",
    "DONOR",
    "INSTALL_HINT",
    "LABEL_SMARTS",
    "MolData",
    "MoleculeConfig",
    "MoleculeTransformer",
    "NeighbourMean",
    "draw_attention",
    "featurize",
    "fingerprint_accuracy",
    "generate",
    "grounding",
    "missing",
    "readout_attention",
    "substructure_atoms",
    "train",
]

INSTALL_HINT = "RDKit is not installed; install it with `pip install 'qkv[chem]'` (or `pip install rdkit`)"

#: the two SMARTS patterns of the label (a molecule is positive when either matches)
LABEL_SMARTS = ("[NX3;H2]-c1ccc(-[N+](=O)[O-])cc1", "[NX3;H2]-c1ccc(-C(=O)[OX2H1])cc1")
DONOR = "N"
"""The primary aromatic amine, as a SMILES branch on a ring carbon."""
ACCEPTORS = ("[N+](=O)[O-]", "C(=O)O")
"""Nitro and carboxylic acid, as SMILES branches on a ring carbon."""
#: other groups on the arms (none is the donor or an acceptor; some look alike: amides, esters, NMe2, ketones)
FILLERS = (
    "C",
    "CC",
    "F",
    "Cl",
    "Br",
    "OC",
    "O",
    "C(F)(F)F",
    "C#N",
    "SC",
    "N(C)C",
    "NC(C)=O",
    "C(C)=O",
    "C(=O)OC",
    "C(N)=O",
    "S(N)(=O)=O",
)
#: linkers joining the arms: [*:i] is where arm i attaches ("" joins two arms by a bond: a biaryl)
LINKERS2 = (
    "",
    "[*:1]C[*:2]",
    "[*:1]O[*:2]",
    "[*:1]N[*:2]",
    "[*:1]C(=O)[*:2]",
    "[*:1]C(=O)N[*:2]",
    "[*:1]S(=O)(=O)N[*:2]",
    "[*:1]CC[*:2]",
    "[*:1]OC[*:2]",
    "[*:1]N1CCN([*:2])CC1",
    "[*:1]/C=C/[*:2]",
    "[*:1]C#C[*:2]",
    "[*:1]c1ccc([*:2])s1",
    "[*:1]NC(=O)N[*:2]",
    "[*:1]C1CCC([*:2])CC1",
)
LINKERS3 = (
    "[*:1]N([*:2])[*:3]",
    "[*:1]C([*:2])[*:3]",
    "[*:1]c1nc([*:2])nc([*:3])n1",
    "[*:1]C(=O)N([*:2])C[*:3]",
)
#: what negatives are made of, and how often: the two groups on different arms, each para to another group
#: ("apart"); both on one ring, ortho or meta ("close"); one of the two only ("single")
KINDS = (("para", 0.5), ("apart", 0.35), ("close", 0.075), ("single", 0.075))

ELEMENTS = ("C", "N", "O", "F", "S", "Cl", "Br")
MAX_DIST = 12
N_DIST = MAX_DIST + 5  # 0 self, 1-4 bonded (single, double, triple, aromatic), d + 3 for distance d in 2..MAX_DIST, last: beyond
_BOND_INDEX = {"SINGLE": 1, "DOUBLE": 2, "TRIPLE": 3, "AROMATIC": 4}
#: categorical atom features: (name, number of values); value 0 of each is also "other"
ATOM_FEATURES = (("element", len(ELEMENTS) + 1), ("charge", 3), ("aromatic", 2), ("hydrogens", 4), ("degree", 5))


def missing() -> str | None:
    """What ``qkv train molecule`` needs and does not find (RDKit, scikit-learn), or None."""
    try:
        import rdkit  # noqa: F401
    except ImportError:
        return INSTALL_HINT
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return "scikit-learn is not installed; install it with `pip install 'qkv[demo]'`"
    return None


def _chem() -> Any:
    """RDKit's ``Chem`` with its warnings off; ``ModuleNotFoundError`` naming the extra when RDKit is missing."""
    try:
        from rdkit import Chem, rdBase
    except ImportError as e:
        raise ModuleNotFoundError(f"qkv train molecule: {INSTALL_HINT}", name="rdkit") from e
    rdBase.DisableLog("rdApp.*")
    return Chem


# ---------------------------------------------------------------------------------------------- molecules


def _arm(i: int, groups: dict[int, str]) -> str:
    """A benzene ring attached at ring atom 0 through dummy ``[*:i]``; ``groups`` maps ring atoms 1-5 to SMILES
    branches."""
    atoms = [f"c({groups[r]})" if r in groups else "c" for r in range(1, 5)]
    last = f"c1({groups[5]})" if 5 in groups else "c1"
    return f"[*:{i}]c1" + "".join(atoms) + last


def _sample(rng: np.random.Generator) -> tuple[str, str]:
    """One molecule's SMILES pieces joined by ``.`` (ready for ``molzip``) and its kind."""
    kind = KINDS[int(rng.choice(len(KINDS), p=[p for _, p in KINDS]))][0]
    n_arms = 3 if rng.random() < 0.3 else 2
    fill = lambda: FILLERS[int(rng.integers(len(FILLERS)))]  # noqa: E731
    # every arm: groups on the para pair (2, 5) (5 is ortho to the attachment, 2 meta); sometimes a small
    # group para to the attachment (3)
    arms: list[dict[int, str]] = [{2: fill(), 5: fill()} for _ in range(n_arms)]
    for a in arms:
        if rng.random() < 0.25:
            a[3] = ("F", "Cl", "C")[int(rng.integers(3))]
    acc = ACCEPTORS[int(rng.integers(len(ACCEPTORS)))]
    pair = [DONOR, acc]
    rng.shuffle(pair)
    k = int(rng.integers(n_arms))
    if kind == "para":
        arms[k][2], arms[k][5] = pair
    elif kind == "apart":
        j = (k + 1 + int(rng.integers(n_arms - 1))) % n_arms
        arms[k][int(rng.choice((2, 5)))] = pair[0]
        arms[j][int(rng.choice((2, 5)))] = pair[1]
    elif kind == "close":
        arms[k].pop(3, None)
        arms[k][2] = pair[0]
        arms[k][int(rng.choice((1, 3)))] = pair[1]  # ortho (1, 3 are both next to 2) ...
        if rng.random() < 0.5:
            del arms[k][int(rng.choice([r for r in (1, 3) if r in arms[k]]))]
            arms[k][4] = pair[1]  # ... or meta
    else:  # single
        arms[k][int(rng.choice((2, 5)))] = pair[0]
    if n_arms == 2:
        linker = LINKERS2[int(rng.integers(len(LINKERS2)))]
        if linker == "":
            return f"{_arm(1, arms[0])}.{_arm(1, arms[1])}", kind
    else:
        linker = LINKERS3[int(rng.integers(len(LINKERS3)))]
    return ".".join([linker] + [_arm(i + 1, a) for i, a in enumerate(arms)]), kind


def generate(n: int, seed: int) -> tuple[list[str], list[str]]:
    """``n`` molecules from the grammar: ``(canonical SMILES, kinds)``, each assembled with RDKit's ``molzip`` and
    sanitised. ``kinds`` says how each was built (``para``, ``apart``, ``close``, ``single``); the label is
    always read from the molecule by :func:`substructure_atoms`, never from the kind."""
    Chem = _chem()
    rng = np.random.default_rng(seed)
    smiles: list[str] = []
    kinds: list[str] = []
    for _ in range(n):
        pieces, kind = _sample(rng)
        mol = Chem.molzip(Chem.MolFromSmiles(pieces))
        Chem.SanitizeMol(mol)
        smiles.append(Chem.MolToSmiles(mol))
        kinds.append(kind)
    return smiles, kinds


_PATTERNS: list[Any] = []


def substructure_atoms(mol: Any) -> list[int]:
    """The atoms of ``mol`` (an RDKit ``Mol`` or a SMILES string) that :data:`LABEL_SMARTS` match, sorted; empty
    for a negative molecule."""
    Chem = _chem()
    if isinstance(mol, str):
        m = Chem.MolFromSmiles(mol)
        if m is None:
            raise ValueError(f"substructure_atoms: RDKit cannot parse the SMILES {mol!r}")
        mol = m
    if not _PATTERNS:
        _PATTERNS.extend(Chem.MolFromSmarts(s) for s in LABEL_SMARTS)
    atoms: set[int] = set()
    for p in _PATTERNS:
        for match in mol.GetSubstructMatches(p):
            atoms.update(match)
    return sorted(atoms)


@dataclass
class MolData:
    """Molecules as tensors, padded to ``L`` atoms.

    Attributes:
        smiles: the ``N`` canonical SMILES (atom ``i`` of the tensors is RDKit's atom ``i`` of that SMILES).
        atoms: ``(N, L, 5)`` long, the categorical features of :data:`ATOM_FEATURES` (0 at padding).
        pair: ``(N, L, L)`` long, the pair index of the bias: 0 self, 1-4 bond type, then shortest-path distance.
        valid: ``(N, L)`` bool, True at real atoms.
        y: ``(N,)`` float, 1.0 where the label's SMARTS match.
        target: ``(N, L)`` bool, True at the atoms they match.
        kinds: how each molecule was built.
    """

    smiles: list[str]
    atoms: Tensor
    pair: Tensor
    valid: Tensor
    y: Tensor
    target: Tensor
    kinds: list[str]

    def __len__(self) -> int:
        return len(self.smiles)

    def subset(self, idx: Tensor) -> MolData:
        """The molecules at ``idx`` (a 1-D long tensor), padded only to the longest of them."""
        ii = idx.tolist()
        L = max(1, int(self.valid[idx].sum(1).max())) if ii else 1
        return MolData(
            [self.smiles[i] for i in ii],
            self.atoms[idx, :L],
            self.pair[idx, :L, :L],
            self.valid[idx, :L],
            self.y[idx],
            self.target[idx, :L],
            [self.kinds[i] for i in ii],
        )


def featurize(smiles: Sequence[str], kinds: Sequence[str] | None = None, max_atoms: int | None = None) -> MolData:
    """Parse ``smiles`` with RDKit into :class:`MolData` (padded to the largest molecule, or ``max_atoms``).

    Raises ``ValueError`` for a SMILES RDKit cannot parse or a molecule with more than ``max_atoms`` atoms."""
    Chem = _chem()
    mols = []
    for s in smiles:
        m = Chem.MolFromSmiles(s)
        if m is None:
            raise ValueError(f"featurize: RDKit cannot parse the SMILES {s!r}")
        mols.append(m)
    longest = max((m.GetNumAtoms() for m in mols), default=1)
    L = longest if max_atoms is None else max_atoms
    if longest > L:
        raise ValueError(f"featurize: a molecule has {longest} atoms, more than max_atoms={L}")
    N = len(mols)
    atoms = np.zeros((N, L, len(ATOM_FEATURES)), dtype=np.int64)
    pair = np.zeros((N, L, L), dtype=np.int64)
    valid = np.zeros((N, L), dtype=bool)
    target = np.zeros((N, L), dtype=bool)
    element = {e: i + 1 for i, e in enumerate(ELEMENTS)}
    for b, m in enumerate(mols):
        n = m.GetNumAtoms()
        valid[b, :n] = True
        atoms[b, :n] = [
            (
                element.get(a.GetSymbol(), 0),
                min(max(a.GetFormalCharge(), -1), 1) + 1,
                int(a.GetIsAromatic()),
                min(a.GetTotalNumHs(), 3),
                min(a.GetDegree(), 4),
            )
            for a in m.GetAtoms()
        ]
        d = np.minimum(Chem.GetDistanceMatrix(m).astype(np.int64), MAX_DIST + 1)
        p = np.where(d >= 2, d + 3, d)  # 2 -> 5, ..., MAX_DIST + 1 (beyond) -> MAX_DIST + 4 = N_DIST - 1
        for bond in m.GetBonds():
            i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
            p[i, j] = p[j, i] = _BOND_INDEX.get(str(bond.GetBondType()), 1)
        pair[b, :n, :n] = p
        target[b, substructure_atoms(m)] = True
    atoms_t, pair_t, valid_t, target_t = (torch.from_numpy(a) for a in (atoms, pair, valid, target))
    y = target_t.any(1).float()
    return MolData(list(smiles), atoms_t, pair_t, valid_t, y, target_t, list(kinds) if kinds is not None else [""] * N)


# ---------------------------------------------------------------------------------------------- the models


class NeighbourMean(nn.Module):
    """The baseline's token mixer: every atom takes the uniform mean of its bonded neighbours and itself (a graph
    convolution; attention with all scores equal under the bond mask): ``out_proj(mean_{j ~ i} v_proj(x_j))``.

    Called as a :class:`qkv.nn.TransformerBlock` mixer: ``mask`` is the bond mask ``(B, 1, L, L)``, bool, True
    where atom ``j`` is bonded to atom ``i`` or is ``i``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, *, mask: Any = None, score_mod: Any = None, cache: Any = None) -> Tensor:
        """``x (B, L, E)`` -> ``(B, L, E)``."""
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape[-2:] != (x.shape[1], x.shape[1]):
            raise ValueError(f"NeighbourMean: mask must be the bool bond mask (B, 1, L, L), got {type(mask).__name__}")
        a = mask[:, 0].to(x.dtype)
        a = a / a.sum(-1, keepdim=True).clamp(min=1)
        return self.out_proj(a @ self.v_proj(x))


class MoleculeTransformer(nn.Module):
    """A molecule classifier over atoms: atom encoder, ``layers`` pre-norm blocks, a readout, one logit.

    With ``attention=True``: self-attention over all atoms with a learned per-head bias by shortest-path distance
    and bond type (:data:`N_DIST` kinds of atom pair), and a learned query that reads the molecule out by
    attention over the atoms. With ``attention=False`` (the baseline): the same blocks with :class:`NeighbourMean`
    mixers (fixed uniform weights over bonded neighbours) and a mean over atoms as the readout.

    Args:
        dim, heads, layers: width, attention heads, blocks; attention: see above; dropout: inside the blocks.
        bias_scale: the pair bias is stored divided by it, so that AdamW moves it ``bias_scale`` times faster
            than the weights (it is in logit units and starts as ALiBi-like slopes on the bond distance).
    """

    def __init__(
        self,
        dim: int = 64,
        heads: int = 4,
        layers: int = 3,
        *,
        attention: bool = True,
        dropout: float = 0.0,
        bias_scale: float = 20.0,
    ) -> None:
        super().__init__()
        self.attention, self.heads = attention, heads
        self.embed = nn.ModuleList(nn.Embedding(n, dim) for _, n in ATOM_FEATURES)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim, heads, 2 * dim, dropout=dropout, norm_first=True, mixer=None if attention else NeighbourMean(dim)
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        if attention:
            # one bias per head and kind of atom pair, shared by the layers as in Graphormer; it starts as ALiBi's
            # slopes on the bond distance (head h: -d / 2^h, local heads and wide ones). It lives in logit units
            # and must move by several of them, while Adam moves a parameter by about lr per step, so it is
            # stored divided by bias_scale (which multiplies its rate of learning by bias_scale)
            dist = torch.tensor([0.0, 1, 1, 1, 1] + [float(d) for d in range(2, MAX_DIST + 2)])
            slopes = 2.0 ** -torch.arange(heads, dtype=torch.float32)
            self.bias_scale = bias_scale
            self.pair_bias = nn.Parameter(-slopes[:, None] * dist[None, :] / bias_scale)
            self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.readout = MultiHeadAttention(dim, heads)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def pair_logits(self) -> Tensor:
        """The bias added to each head's scores for each kind of atom pair: ``(heads, N_DIST)``."""
        return self.pair_bias * self.bias_scale

    def forward(self, atoms: Tensor, pair: Tensor, valid: Tensor) -> Tensor:
        """``atoms (B, L, 5)``, ``pair (B, L, L)``, ``valid (B, L)`` (as :class:`MolData`) -> logits ``(B,)``."""
        if atoms.dim() != 3 or atoms.shape[-1] != len(ATOM_FEATURES):
            raise ValueError(f"MoleculeTransformer: atoms must be (B, L, {len(ATOM_FEATURES)}), got {tuple(atoms.shape)}")
        B, L, _ = atoms.shape
        if tuple(pair.shape) != (B, L, L) or tuple(valid.shape) != (B, L):
            raise ValueError(
                f"MoleculeTransformer: pair must be (B, L, L) and valid (B, L) for atoms {tuple(atoms.shape)},"
                f" got {tuple(pair.shape)} and {tuple(valid.shape)}"
            )
        top = torch.tensor([n for _, n in ATOM_FEATURES])
        if bool((atoms < 0).any() or (atoms >= top).any() or (pair < 0).any() or (pair >= N_DIST).any()):
            raise ValueError(
                f"MoleculeTransformer: atoms hold feature codes below {top.tolist()} and pair indices in [0, {N_DIST});"
                " build them with featurize()"
            )
        h = sum(e(atoms[..., i]) for i, e in enumerate(self.embed))
        assert isinstance(h, Tensor)
        keys = valid[:, None, None, :]  # (B, 1, 1, L)
        if self.attention:
            pb = bias(self.pair_logits()[:, pair].transpose(0, 1))  # (B, H, L, L)
            for blk in self.blocks:
                h = blk(h, mask=keys, score_mod=pb)
            h = self.norm(h)
            pooled = self.readout(self.query.expand(B, 1, -1), h, mask=keys)[:, 0]
        else:
            bonds = (pair <= 4) & valid[:, :, None] & valid[:, None, :]  # self (0) and bonded (1-4)
            for blk in self.blocks:
                h = blk(h, mask=bonds[:, None])
            h = self.norm(h)
            w = valid.to(h.dtype)
            pooled = (h * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
        out: Tensor = self.head(pooled)[:, 0]
        return out


@torch.no_grad()
def readout_attention(model: MoleculeTransformer, data: MolData, batch: int = 256) -> tuple[Tensor, Tensor]:
    """Where the readout looks: ``(readout (N, L), rollout (N, L))``, each row a distribution over the atoms.

    ``readout``: the readout query's attention (mean over its heads), captured from the model's ``readout``
    layer through :func:`qkv.analysis.capture`; ``rollout``: that attention carried back through the
    self-attention layers by attention rollout (:func:`qkv.analysis.attention_rollout`, residual 0.5)."""
    if not model.attention:
        raise ValueError("readout_attention: the model has no attention (attention=False)")
    model.eval()
    reads, rolls = [], []
    for i in range(0, len(data), batch):
        sl = slice(i, i + batch)
        maps = capture(model, data.atoms[sl], data.pair[sl], data.valid[sl])
        if maps.names[-1] != "readout":
            raise ValueError(f"readout_attention: the last captured layer is {maps.names[-1]!r}, not the readout")
        r = maps.weights[-1].mean(1)[:, 0].double()  # (b, L)
        roll = attention_rollout(maps.weights[:-1])  # (b, L, L), float64
        reads.append(r)
        rolls.append(torch.einsum("bk,bkj->bj", r, roll))
    return torch.cat(reads), torch.cat(rolls)


def grounding(attn: Tensor, target: Tensor, valid: Tensor) -> dict[str, float]:
    """How much of each molecule's attention lands on its substructure, against chance.

    Args:
        attn: ``(N, L)`` attention over the atoms (rows summing to 1 over the valid atoms).
        target: ``(N, L)`` bool, True at the substructure's atoms (every row has at least one).
        valid: ``(N, L)`` bool, True at real atoms.

    Returns:
        ``share``: the mean share of attention on the substructure; ``chance``: the mean share that uniform
        attention over the atoms would give (substructure atoms / atoms); ``top``: the fraction of molecules whose
        most-attended atom is in the substructure (its chance is ``chance`` too)."""
    if attn.dim() != 2 or attn.shape != target.shape or attn.shape != valid.shape:
        raise ValueError(
            f"grounding: attn, target and valid must be (N, L) alike, got {tuple(attn.shape)},"
            f" {tuple(target.shape)}, {tuple(valid.shape)}"
        )
    if len(attn) == 0 or not bool(target.any(1).all()) or bool((target & ~valid).any()):
        raise ValueError("grounding: every row needs a substructure atom, and only at valid atoms")
    a = attn.double().masked_fill(~valid, 0.0)
    share = (a * target).sum(1) / a.sum(1)
    chance = target.sum(1).double() / valid.sum(1).double()
    top = target.gather(1, a.argmax(1, keepdim=True))[:, 0].double()
    return {"share": float(share.mean()), "chance": float(chance.mean()), "top": float(top.mean())}


def fingerprint_accuracy(train_smiles: Sequence[str], y_train: Tensor, test_smiles: Sequence[str], y_test: Tensor,
                         radius: int = 2, bits: int = 2048) -> float:
    """Held-out accuracy of a logistic regression (scikit-learn, ``C=1``) on Morgan fingerprints (``radius``,
    ``bits``; radius 2 is ECFP4)."""
    from rdkit.Chem import rdFingerprintGenerator
    from sklearn.linear_model import LogisticRegression

    Chem = _chem()
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)

    def fps(smiles: Sequence[str]) -> np.ndarray:
        return np.stack([gen.GetFingerprintAsNumPy(Chem.MolFromSmiles(s)) for s in smiles]).astype(np.float32)

    clf = LogisticRegression(max_iter=5000).fit(fps(train_smiles), y_train.numpy())
    return float(clf.score(fps(test_smiles), y_test.numpy()))


# ---------------------------------------------------------------------------------------------- picture


def draw_attention(smiles: Sequence[str], attn: Sequence[Tensor], path: str, legends: Sequence[str] | None = None,
                   size: tuple[int, int] = (300, 260)) -> None:
    """Draw molecules side by side with RDKit (``MolDraw2DCairo``), each atom shaded by its attention (white to
    red, scaled to the molecule's most-attended atom) and the bonds of the label's substructure drawn in blue;
    write a PNG to ``path``.

    Args:
        smiles: the molecules; attn: per molecule ``(n_atoms,)`` (or longer: padding is ignored) weights;
        legends: a caption under each; size: one panel's ``(width, height)`` in pixels."""
    from rdkit.Chem.Draw import rdMolDraw2D

    Chem = _chem()
    if len(smiles) != len(attn) or not smiles:
        raise ValueError(f"draw_attention: need as many attention rows as molecules, got {len(attn)} and {len(smiles)}")
    mols, h_atoms, h_colors, h_radii, h_bonds, b_colors = [], [], [], [], [], []
    for s, a in zip(smiles, attn):
        m = Chem.MolFromSmiles(s)
        n = m.GetNumAtoms()
        a64 = a[:n].double()
        w = (a64 / a64.max().clamp(min=1e-12)).tolist()
        mols.append(m)
        h_atoms.append(list(range(n)))
        h_colors.append({i: (1.0, 1.0 - 0.85 * w[i], 1.0 - 0.85 * w[i]) for i in range(n)})
        h_radii.append({i: 0.25 + 0.25 * w[i] for i in range(n)})
        sub = set(substructure_atoms(m))
        bonds = [b.GetIdx() for b in m.GetBonds() if b.GetBeginAtomIdx() in sub and b.GetEndAtomIdx() in sub]
        h_bonds.append(bonds)
        b_colors.append({b: (0.35, 0.55, 1.0) for b in bonds})
    W, H = size
    d = rdMolDraw2D.MolDraw2DCairo(W * len(mols), H, W, H)
    d.DrawMolecules(
        mols,
        legends=list(legends) if legends is not None else None,
        highlightAtoms=h_atoms,
        highlightAtomColors=h_colors,
        highlightAtomRadii=h_radii,
        highlightBonds=h_bonds,
        highlightBondColors=b_colors,
    )
    d.FinishDrawing()
    with open(path, "wb") as f:
        f.write(d.GetDrawingText())


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class MoleculeConfig:
    """Sizes of a run: generated molecules for training and test, model width/heads/layers, steps, batch, lr."""

    n_train: int = 6000
    n_test: int = 2000
    dim: int = 64
    heads: int = 4
    layers: int = 3
    steps: int = 1500
    batch: int = 64
    lr: float = 2e-3

    @staticmethod
    def quick() -> MoleculeConfig:
        return MoleculeConfig(n_train=1000, n_test=300, dim=32, layers=2, steps=400, batch=32, lr=3e-3)


def _batches(data: MolData, batch: int, seed: int) -> Iterator[MolData]:
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(data), generator=g)
        for i in range(0, len(data) - batch + 1, batch):
            yield data.subset(perm[i : i + batch])


def _loss(model: nn.Module, b: MolData) -> Tensor:
    return F.binary_cross_entropy_with_logits(model(b.atoms, b.pair, b.valid), b.y)


@torch.no_grad()
def _accuracy(model: MoleculeTransformer, data: MolData) -> float:
    model.eval()
    logits = torch.cat([model(data.atoms[i : i + 512], data.pair[i : i + 512], data.valid[i : i + 512])
                        for i in range(0, len(data), 512)])
    return float(((logits > 0).float() == data.y).float().mean())


def _picture(model: MoleculeTransformer, te: MolData, pos: MolData, roll: Tensor, path: str) -> None:
    """Held-out molecules shaded by attention rollout: a positive with a nitro group, one with an acid, and a decoy
    (the amine and the acceptor on different rings)."""
    nitro = [i for i, s in enumerate(pos.smiles) if "[N+](=O)[O-]" in s]
    acid = [i for i, s in enumerate(pos.smiles) if "[N+](=O)[O-]" not in s]
    smiles, attn, legends = [], [], []
    for i in (nitro[:1] + acid[:1]) or [0]:
        smiles.append(pos.smiles[i])
        attn.append(roll[i])
        chance = float(pos.target[i].sum() / pos.valid[i].sum())
        legends.append(f"rollout on the substructure {float((roll[i] * pos.target[i]).sum()):.0%} (chance {chance:.0%})")
    decoys = [i for i, k in enumerate(te.kinds) if k == "apart" and te.y[i] == 0]
    if decoys:
        dec = te.subset(torch.tensor(decoys[:1]))
        with torch.no_grad():
            p = float(torch.sigmoid(model(dec.atoms, dec.pair, dec.valid))[0])
        smiles.append(dec.smiles[0])
        attn.append(readout_attention(model, dec)[1][0])
        legends.append(f"decoy, groups on two rings: p(positive) {p:.2f}")
    draw_attention(smiles, attn, path, legends)


def train(
    out: str | None = None,
    quick: bool = False,
    seed: int = 0,
    progress: bool = False,
    cfg: MoleculeConfig | None = None,
) -> TaskResult:
    """Generate molecules, train the attention model and the graph-convolution baseline, fit the fingerprint
    baseline; report held-out accuracy of each and the attention model's grounding on positive molecules."""
    cfg = cfg or (MoleculeConfig.quick() if quick else MoleculeConfig())
    smiles, kinds = generate(cfg.n_train + cfg.n_test, seed)
    data = featurize(smiles, kinds)
    tr = data.subset(torch.arange(cfg.n_train))
    te = data.subset(torch.arange(cfg.n_train, len(data)))
    acc: dict[str, float] = {}
    models: dict[str, MoleculeTransformer] = {}
    losses: list[float] = []
    for name, attention in (("attention", True), ("graph convolution", False)):
        torch.manual_seed(seed)
        model = MoleculeTransformer(cfg.dim, cfg.heads, cfg.layers, attention=attention)
        ls = fit(model, _batches(tr, cfg.batch, seed), _loss, cfg.steps, cfg.lr, desc=f"molecule ({name})",
                 progress=progress, weight_decay=0.01)
        if attention:
            losses = ls
        acc[name] = _accuracy(model, te)
        models[name] = model
    ecfp4 = fingerprint_accuracy(tr.smiles, tr.y, te.smiles, te.y, radius=2)
    ecfp6 = fingerprint_accuracy(tr.smiles, tr.y, te.smiles, te.y, radius=3)
    model = models["attention"]
    pos = te.subset(torch.nonzero(te.y > 0)[:, 0])
    read, roll = readout_attention(model, pos)
    g_roll = grounding(roll, pos.target, pos.valid)
    g_read = grounding(read, pos.target, pos.valid)
    files: list[str] = []
    if out is not None:
        path = os.path.join(out, "molecule_attention.png")
        _picture(model, te, pos, roll, path)
        files.append(path)
    by_kind = []
    for kind, _ in KINDS:
        sel = torch.tensor([i for i, k in enumerate(te.kinds) if k == kind], dtype=torch.long)
        if len(sel):
            sub = te.subset(sel)
            by_kind.append(
                f"{kind} {_accuracy(model, sub):.1%} / {_accuracy(models['graph convolution'], sub):.1%} (n={len(sel)})"
            )
    notes = [
        f"{cfg.n_train} training / {cfg.n_test} held-out generated molecules ({float(data.y.mean()):.0%} positive,"
        f" {float(data.valid.sum(1).float().mean()):.1f} atoms on average)",
        f"graph convolution (the same network, no attention, mean pooling) {acc['graph convolution']:.1%};"
        f" ECFP4 + logistic regression {ecfp4:.1%}; ECFP6 {ecfp6:.1%}",
        f"grounding on {len(pos)} held-out positives: attention rollout on the substructure {g_roll['share']:.1%}"
        f" (chance {g_roll['chance']:.1%}), its top atom in it {g_roll['top']:.1%};"
        f" the readout's own attention {g_read['share']:.1%}, top atom {g_read['top']:.1%}",
        "accuracy by kind of molecule (attention / graph convolution): " + "; ".join(by_kind),
    ]
    return TaskResult(
        "molecule",
        "held-out accuracy (attention)",
        acc["attention"],
        "ECFP4 + logistic regression",
        ecfp4,
        losses,
        notes,
        files,
        model,
    )
