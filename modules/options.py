"""Settings: OptionInfo registry, config.json persistence (A1111 names and file format)."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

from modules.atomic import write_text_atomic


class OptionInfo:
    def __init__(self, default: Any = None, label: str = "", component: Any = None,
                 component_args: Any = None, onchange: Callable | None = None, section: tuple | None = None,
                 refresh: Callable | None = None, comment_before: str = "", comment_after: str = "",
                 infotext: str | None = None, restrict_api: bool = False, category_id: str | None = None,
                 validate: Callable[[Any], Any] | None = None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api
        self.validate = validate  # value → the value to store, or ValueError saying what is wrong with it

    def link(self, label: str, url: str) -> "OptionInfo":
        self.comment_before += f"[<a href='{url}' target='_blank'>{label}</a>]"
        return self

    def js(self, label: str, js_func: str) -> "OptionInfo":
        return self

    def info(self, info: str) -> "OptionInfo":
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def html(self, html: str) -> "OptionInfo":
        self.comment_after += html
        return self

    def needs_restart(self) -> "OptionInfo":
        self.comment_after += " <span class='info'>(requires restart)</span>"
        return self

    def needs_reload_ui(self) -> "OptionInfo":
        self.comment_after += " <span class='info'>(requires Reload UI)</span>"
        return self


class OptionHTML(OptionInfo):
    def __init__(self, text: str):
        super().__init__(str(text).strip(), label="", component=None)
        self.do_not_save = True


def options_section(section_identifier: tuple, options_dict: dict, category_id: str | None = None) -> dict:
    for v in options_dict.values():
        if len(section_identifier) == 2:
            v.section = section_identifier
        elif len(section_identifier) == 3:
            v.section = section_identifier[0:2]
            v.category_id = section_identifier[2]
        if category_id is not None:
            v.category_id = category_id
    return options_dict


class Options:
    typemap = {int: float}

    def __init__(self, data_labels: dict[str, OptionInfo], restricted_opts: set | None = None):
        self.data_labels = data_labels
        self.data = {k: v.default for k, v in self.data_labels.items() if not v.do_not_save}
        self.restricted_opts = restricted_opts or set()

    def __setattr__(self, key, value):
        if key in ("data", "data_labels", "restricted_opts", "typemap"):
            return super().__setattr__(key, value)
        if key in self.data or key in self.data_labels:
            self.data[key] = value
            return
        return super().__setattr__(key, value)

    def __getattr__(self, item):
        if item in ("data", "data_labels", "restricted_opts"):
            raise AttributeError(item)
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(f"no option named {item!r}")

    def check(self, key: str, value: Any) -> Any:
        """The value `key` would store: the option's own check may normalise it, or refuse it with ValueError."""
        validate = getattr(self.data_labels.get(key), "validate", None)
        return value if validate is None else validate(value)

    def set(self, key: str, value: Any, is_api: bool = False, run_callbacks: bool = True) -> bool:
        """Sets an option and calls its onchange callback; returns False for unknown keys or unchanged values,
        raises ValueError for a value the option refuses."""
        value = self.check(key, value)
        oldval = self.data.get(key, None)
        if oldval == value:
            return False
        info = self.data_labels.get(key)
        if info is None or info.do_not_save:
            return False
        if is_api and info.restrict_api:
            return False
        self.data[key] = value
        if run_callbacks and info.onchange is not None:
            try:
                info.onchange()
            except Exception:
                self.data[key] = oldval
                raise
        return True

    def get_default(self, key: str) -> Any:
        info = self.data_labels.get(key)
        return None if info is None else info.default

    def add_option(self, key: str, info: OptionInfo) -> None:
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def save(self, filename: str) -> None:
        write_text_atomic(filename, json.dumps(self.data, indent=4, ensure_ascii=False))

    def load(self, filename: str) -> None:
        if not os.path.isfile(filename):
            return
        try:
            with open(filename, "r", encoding="utf8") as file:
                loaded = json.load(file)
        except Exception as e:
            print(f"*** Could not read settings file {filename}: {e}; using defaults (the file is left as it is)")
            return
        if isinstance(loaded, dict):
            self.data.update(loaded)
        for key in list(self.data):
            try:
                self.data[key] = self.check(key, self.data[key])
            except ValueError as e:
                default = self.get_default(key)
                print(f"*** Setting {key} in {filename}: {e}; using {default!r} (the file is left as it is)")
                self.data[key] = default

    def onchange(self, key: str, func: Callable, call: bool = True) -> None:
        item = self.data_labels.get(key)
        if item is not None:
            item.onchange = func
        if call:
            func()

    def dumpjson(self) -> str:
        return json.dumps({k: self.data.get(k, v.default) for k, v in self.data_labels.items() if not v.do_not_save})

    def same_type(self, x: Any, y: Any) -> bool:
        if x is None or y is None:
            return True
        type_x = self.typemap.get(type(x), type(x))
        type_y = self.typemap.get(type(y), type(y))
        return type_x == type_y
