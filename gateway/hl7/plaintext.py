"""A str that remembers it is bound for a base64Binary element (see translate._prune).

In a module of its own: translate.py may be compiled (mypyc), and a compiled class cannot
subclass str."""


class PlainText(str):
    """Text destined for a base64Binary element, still readable so OBX lines can be joined;
    encoded when the resource is finished."""
