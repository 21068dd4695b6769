"""The papers gradood's detectors come from, as structured citations.

Every registered detector sets ``citation`` to one of these, so that tables (``gradood list``,
docs/detectors.md) show one consistent source column -- "first author et al., venue year" -- and
docs/methods.md can link each method to its paper.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Citation:
    """A paper: ``authors`` (family names, first author first), ``title``, ``venue`` and ``year`` of the
    version gradood follows, and a ``url`` (arXiv / OpenReview / proceedings)."""

    authors: tuple[str, ...]
    title: str
    venue: str
    year: int
    url: str = ""
    #: True when ``authors`` lists only the first author(s) of a longer list
    more_authors: bool = False

    @property
    def first_author(self) -> str:
        return self.authors[0] if self.authors else "Anonymous"

    @property
    def short(self) -> str:
        """``"Liang et al., ICLR 2018"``: the first author (``et al.`` when there are more), venue and year."""
        who = self.first_author + (" et al." if len(self.authors) > 1 or self.more_authors else "")
        return f"{who}, {self.venue} {self.year}"

    def __str__(self) -> str:
        return f"{', '.join(self.authors) or 'Anonymous'}{' et al.' if self.more_authors else ''}: {self.title}. {self.venue} {self.year}. {self.url}".strip()


MSP = Citation(("Hendrycks", "Gimpel"), "A Baseline for Detecting Misclassified and Out-of-Distribution Examples "
               "in Neural Networks", "ICLR", 2017, "https://arxiv.org/abs/1610.02136")
SCALING_OOD = Citation(("Hendrycks", "Basart", "Mazeika", "Zou", "Kwon", "Mostajabi", "Steinhardt", "Song"),
                       "Scaling Out-of-Distribution Detection for Real-World Settings", "ICML", 2022,
                       "https://arxiv.org/abs/1911.11132")
ENERGY = Citation(("Liu", "Wang", "Owens", "Li"), "Energy-based Out-of-distribution Detection", "NeurIPS", 2020,
                  "https://arxiv.org/abs/2010.03759")
ODIN = Citation(("Liang", "Li", "Srikant"), "Enhancing the Reliability of Out-of-distribution Image Detection in "
                "Neural Networks", "ICLR", 2018, "https://arxiv.org/abs/1706.02690")
MAHALANOBIS = Citation(("Lee", "Lee", "Lee", "Shin"), "A Simple Unified Framework for Detecting Out-of-Distribution "
                       "Samples and Adversarial Attacks", "NeurIPS", 2018, "https://arxiv.org/abs/1807.03888")
REACT = Citation(("Sun", "Guo", "Li"), "ReAct: Out-of-distribution Detection With Rectified Activations", "NeurIPS",
                 2021, "https://arxiv.org/abs/2111.12797")
KNN = Citation(("Sun", "Ming", "Zhu", "Li"), "Out-of-Distribution Detection with Deep Nearest Neighbors", "ICML",
               2022, "https://arxiv.org/abs/2204.06507")
VIM = Citation(("Wang", "Li", "Feng", "Zhang"), "ViM: Out-Of-Distribution with Virtual-logit Matching", "CVPR", 2022,
               "https://arxiv.org/abs/2203.10807")
GRADNORM = Citation(("Huang", "Geng", "Li"), "On the Importance of Gradients for Detecting Distributional Shifts in "
                    "the Wild", "NeurIPS", 2021, "https://arxiv.org/abs/2110.00218")
IGOE = Citation(("Igoe", "Mehta", "Xu"), "How Useful are Gradients for OOD Detection Really?", "arXiv", 2022,
                "https://arxiv.org/abs/2205.10439")
#: published anonymously (double-blind ICLR 2023 submission); the authors are not named in the paper.
RG = Citation((), "RG: Out-of-Distribution Detection with Reactivate GradNorm", "ICLR submission", 2023,
              "https://openreview.net/forum?id=-hMNEMgT8Wd")
#: the text gradood follows is an anonymous double-blind submission whose latest references are from 2021;
#: authors as listed publicly for the paper (Yengalych, Kuralenok, Ershov).
GRODIN = Citation(("Yengalych", "Kuralenok", "Ershov"), "GRODIN: Improved Large-Scale Out-of-Domain Detection via "
                  "Back-propagation", "OpenReview", 2022, "")
LOWDIM = Citation(("Wu", "Li", "Cheng", "Yang", "Huang"), "Low-Dimensional Gradient Helps Out-of-Distribution "
                  "Detection", "arXiv", 2023, "https://arxiv.org/abs/2310.17163")
FSSD = Citation(("Huang", "Li", "Wang", "Chen", "Dong", "Zhou"), "Feature Space Singularity for Out-of-Distribution "
                "Detection", "SafeAI", 2021, "https://arxiv.org/abs/2011.14654")

# Papers of the detectors added for issue 13 (their own modules set ``citation`` to these).
OPENOOD = Citation(("Yang",), "OpenOOD: Benchmarking Generalized Out-of-Distribution "
                   "Detection", "NeurIPS D&B", 2022, "https://arxiv.org/abs/2210.07242",
                   more_authors=True)
RMD = Citation(("Ren", "Fort", "Liu", "Roy", "Padhy", "Lakshminarayanan"), "A Simple Fix to Mahalanobis Distance "
               "for Improving Near-OOD Detection", "arXiv", 2021, "https://arxiv.org/abs/2106.09022")
GEM = Citation(("Morteza", "Li"), "Provable Guarantees for Understanding Out-of-distribution Detection", "AAAI",
               2022)
FDBD = Citation(("Liu", "Qin"), "Fast Decision Boundary based Out-of-Distribution Detector", "ICML", 2024)
NCI = Citation(("Liu", "Qin"), "Detecting Out-of-distribution through the Lens of Neural Collapse", "CVPR", 2025)
NNGUIDE = Citation(("Park", "Jung", "Teoh"), "Nearest Neighbor Guidance for Out-of-Distribution Detection", "ICCV",
                   2023)
SHE = Citation(("Zhang",), "Out-of-Distribution Detection based on "
               "In-Distribution Data Patterns Memorization with Modern Hopfield Energy", "ICLR", 2023, more_authors=True)
ASH = Citation(("Djurisic", "Bozanic", "Ashok", "Liu"), "Extremely Simple Activation Shaping for "
               "Out-of-Distribution Detection", "ICLR", 2023, "https://arxiv.org/abs/2209.09858")
SCALE = Citation(("Xu", "Chen", "Franchi", "Yao"), "Scaling for Training Time and Post-hoc Out-of-distribution "
                 "Detection Enhancement", "ICLR", 2024)
DICE = Citation(("Sun", "Li"), "DICE: Leveraging Sparsification for Out-of-Distribution Detection", "ECCV", 2022,
                "https://arxiv.org/abs/2111.09805")
BATS = Citation(("Zhu",), "Boosting Out-of-distribution Detection with "
                "Typical Features", "NeurIPS", 2022, more_authors=True)
GEN = Citation(("Liu", "Lochman", "Zach"), "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution "
               "Detection", "CVPR", 2023, "")
TEMPERATURE_SCALING = Citation(("Guo", "Pleiss", "Sun", "Weinberger"), "On Calibration of Modern Neural Networks",
                               "ICML", 2017, "https://arxiv.org/abs/1706.04599")
VOS = Citation(("Du", "Wang", "Cai", "Li"), "VOS: Learning What You Don't Know by Virtual Outlier Synthesis",
               "ICLR", 2022, "https://arxiv.org/abs/2202.01197")
RANKFEAT = Citation(("Song", "Sebe", "Wang"), "RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection",
                    "NeurIPS", 2022, "https://arxiv.org/abs/2209.08590")
