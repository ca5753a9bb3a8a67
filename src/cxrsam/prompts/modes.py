"""The enumerated prompt modes (``StrEnum``: members compare equal to their strings)."""

from enum import StrEnum


class PromptMode(StrEnum):
    """What each prompt set holds: a box, points, or both."""

    BOX = "box"
    POINTS = "points"
    BOX_POINTS = "box+points"


class BoxMode(StrEnum):
    """``per_lung``: one prompt set per lung, masks merged by union; ``enclosing``: one set for both lungs."""

    PER_LUNG = "per_lung"
    ENCLOSING = "enclosing"


class PointStrategy(StrEnum):
    """Where positive points go: inside a lung (:func:`cxrsam.prompts.points.positive_points`, ``points_per_lung``
    each), or ``probability``: a total per image drawn at random with the draft's foreground probability as the
    weight (:func:`cxrsam.prompts.points.probability_points`, the paper's protocol)."""

    DISTANCE = "distance"
    KMEANS = "kmeans"
    RANDOM = "random"
    PROBABILITY = "probability"


class NegativeKind(StrEnum):
    """Background points (:func:`cxrsam.prompts.points.negative_points`)."""

    MEDIASTINUM = "mediastinum"
    OUTSIDE = "outside"


class TrainPrompt(StrEnum):
    """Prompts of a fine-tuning example: one kind for all, or ``mixed``: the kind drawn per example from a
    :class:`~cxrsam.prompts.spec.PromptMixture`."""

    BOX = "box"
    POINTS = "points"
    BOX_POINTS = "box+points"
    MIXED = "mixed"
