"""Twenty JSON schemas for structured-output tests: nested objects, arrays with bounds, enums, numbers
with ranges, required/optional properties, anyOf. Strings are length-bounded so a random tiny model
(whose free choice is noise) still closes them within a small max_tokens."""

S = {"type": "string", "maxLength": 6}

SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": S}, "required": ["name"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
     "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": -5,
                                                                        "maximum": 5}, "minItems": 1, "maxItems": 3}},
     "required": ["xs"], "additionalProperties": False},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {"a": S, "b": {"type": "boolean"}},
                                                "required": ["a", "b"], "additionalProperties": False}},
     "required": ["inner"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 100, "maximum": 199}, "tag": S},
     "required": ["id"], "additionalProperties": False},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 50},
                                                      {"type": "string", "maxLength": 4}]}},
     "required": ["v"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"p": {"type": "object", "properties": {
        "q": {"type": "object", "properties": {"r": {"type": "integer", "minimum": 1, "maximum": 3}},
              "required": ["r"], "additionalProperties": False}}, "required": ["q"], "additionalProperties": False}},
     "required": ["p"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"type": "string", "enum": ["low", "mid", "high"]},
                                      "score": {"type": "integer", "minimum": 0, "maximum": 10}},
     "required": ["level", "score"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"k": S, "v": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["k", "v"], "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"maybe": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}},
     "required": ["maybe"], "additionalProperties": False},
    {"type": "object", "properties": {"flag": {"const": "on"}}, "required": ["flag"], "additionalProperties": False},
    {"type": "object", "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"r": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["r"],
         "additionalProperties": False},
        {"type": "object", "properties": {"w": {"type": "integer", "minimum": 1, "maximum": 9},
                                          "h": {"type": "integer", "minimum": 1, "maximum": 9}},
         "required": ["w", "h"], "additionalProperties": False}]}}, "required": ["shape"], "additionalProperties": False},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "maxItems": 2}, "n": {"type": "boolean"}},
     "required": ["tags", "n"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 5},
                                      "b": {"type": "integer", "minimum": 0, "maximum": 5},
                                      "c": {"enum": [1, 2, 3]}}, "required": ["a", "b", "c"],
     "additionalProperties": False},
    {"type": "string", "enum": ["yes", "no"]},
    {"type": "object", "properties": {"m": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "boolean"}}}}, "required": ["m"],
     "additionalProperties": False},
]

assert len(SCHEMAS) == 20
