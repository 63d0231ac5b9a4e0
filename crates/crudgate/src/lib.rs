//! crudgate: the write path of PowerSync apps.
