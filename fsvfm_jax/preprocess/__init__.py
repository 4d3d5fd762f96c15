"""Face preprocessing: detect, crop and parse into LaPa regions (docs/preprocess.md).

Modules: assets (install-time model/photo cache), litert (MediaPipe detector, face mesh
and selfie segmentation on LiteRT), regions (LaPa maps from mesh contours, overlays),
backends (`FaceBackend`: mediapipe default, facer optional), pipeline (folder of
images/videos -> images/ + parsing_maps/, resumable, parallel, reported). The command
line is tools/preprocess.py; docs/preprocess.md explains the choices.
"""
