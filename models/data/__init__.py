"""A job's images as the engine feeds them: `loader` (the scan in the job's roles, transforms, the
DataLoader), `inmemory` (decode once, keep in memory), `augment` (crop, flip, colour jitter and
normalisation on the device), `batches` (a job's data as the stages use it, from memory or the
DataLoader, and the teacher cache), `hub` (Hugging Face and torchvision datasets turned into
ImageFolders).
"""
