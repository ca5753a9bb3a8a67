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
    """Where positive points go inside a lung (:func:`cxrsam.prompts.points.positive_points`)."""

    DISTANCE = "distance"
    KMEANS = "kmeans"
    RANDOM = "random"


class NegativeKind(StrEnum):
    """Background points (:func:`cxrsam.prompts.points.negative_points`)."""

    MEDIASTINUM = "mediastinum"
    OUTSIDE = "outside"
