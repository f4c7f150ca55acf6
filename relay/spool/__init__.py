"""The sealed spool on the edge: mail sealed to home's key (keys, sealed), kept durably (store), served to home
over the tunnel (service, client). docs/spool-format.md describes the file format, the directory and the service."""
