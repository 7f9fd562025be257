//! A plugin to copy: a filter that upper-cases text messages on the channels
//! its manifest (`plugin.toml`) names. See README.md, "Write a plugin".

use wasmrelay_plugin_sdk::filter::{self, Verdict};
use wasmrelay_plugin_sdk::log;

struct Shout;

impl filter::Guest for Shout {
    fn init(_config: String) -> Result<(), String> {
        log::log(log::Level::Info, "shout is ready");
        Ok(())
    }

    fn self_check() -> Result<(), String> {
        Ok(())
    }

    fn on_message(_channel: String, data: Vec<u8>) -> Verdict {
        match String::from_utf8(data) {
            Ok(text) => Verdict::Replace(text.to_uppercase().into_bytes()),
            Err(_) => Verdict::Keep,
        }
    }
}

wasmrelay_plugin_sdk::filter::export_filter!(Shout);
