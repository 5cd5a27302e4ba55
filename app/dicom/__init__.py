"""DICOM integration: receive chest radiographs (C-STORE SCP, STOW-RS), answer with a DICOM SR
and a Grad-CAM secondary capture, deliver them through a persisted, encrypted outbox."""
