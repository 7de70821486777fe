//! vfio-user for dmalog (in progress).
