"""Local web app (``cxrsam app``): upload a CXR, see and refine the lung mask, download it."""
