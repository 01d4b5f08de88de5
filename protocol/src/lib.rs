//! vfio-user wire format.
