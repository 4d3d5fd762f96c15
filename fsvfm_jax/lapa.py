"""The LaPa face-parsing labels and the CRFR-P region groups built from them.

Labels are in the order of FACER's ``farl/lapa/448`` parser, which produced the published parsing
maps; "right" is the subject's right. CRFR-P groups labels into eight regions and covers one of the
first six (docs/method.md, "LaPa labels" and "Region groups").
"""

from __future__ import annotations

from typing import NamedTuple

LABEL_NAMES = ("background", "skin", "right_brow", "left_brow", "right_eye", "left_eye",
               "nose", "upper_lip", "inner_mouth", "lower_lip", "hair")
NUM_LABELS = len(LABEL_NAMES)
(BACKGROUND, SKIN, RIGHT_BROW, LEFT_BROW, RIGHT_EYE, LEFT_EYE,
 NOSE, UPPER_LIP, INNER_MOUTH, LOWER_LIP, HAIR) = range(NUM_LABELS)


class RegionGroup(NamedTuple):
    """A CRFR-P region group: a patch belongs to it if any pixel carries one of ``labels``."""

    name: str
    labels: tuple[int, ...]


REGION_GROUPS = (
    RegionGroup("eyebrows", (RIGHT_BROW, LEFT_BROW)),
    RegionGroup("eyes", (RIGHT_EYE, LEFT_EYE)),
    RegionGroup("nose", (NOSE,)),
    RegionGroup("mouth", (UPPER_LIP, INNER_MOUTH, LOWER_LIP)),
    # Special rule, not a label set: a patch with a hair-or-background pixel AND a skin pixel.
    RegionGroup("facial_boundary", ()),
    RegionGroup("hair", (HAIR,)),
    RegionGroup("skin", (SKIN,)),
    RegionGroup("background", (BACKGROUND,)),
)
BOUNDARY_GROUP = 4
NUM_CHOOSABLE_GROUPS = 6  # the published collate draws the covered region from groups 0-5 only
