"""The networks: `factory` (timm models and their data configs), `weights` (hub, file and package
weights, with a head for the target's classes), `features` (the feature taps methods read) and
`bank` (each of a job's models built once, shared by validation and the stages).
"""
