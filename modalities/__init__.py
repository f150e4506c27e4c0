"""Modality plug-ins (installed as ``xmodal.modalities``): one flat module per modality."""
