//! VFIO_USER_VERSION: version numbers and the capabilities JSON.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ProtocolError;
use crate::wire::{Reader, Writer};

pub const MAJOR: u16 = 0;
pub const MINOR: u16 = 0;

/// A usable IOVA range, `end` inclusive (airlock extension, offered only to
/// clients that propose it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IovaRange {
    pub start: u64,
    pub end: u64,
}

/// The "capabilities" object. Known keys are typed; anything else a peer
/// proposes (migration, twin_socket, ...) is kept in `other` untouched.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_msg_fds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_data_xfer_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_dma_maps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgsizes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_multiple: Option<bool>,
    /// airlock extension: DMA_MAP_MULTI and DMA_UNMAP_MULTI (dma_multi.rs),
    /// answered only to a client that proposed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dma_multiple: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iova_ranges: Option<Vec<IovaRange>>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
struct VersionJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    capabilities: Option<Capabilities>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
    /// None when the message carried no JSON at all.
    pub capabilities: Option<Capabilities>,
}

impl Version {
    pub fn decode(payload: &[u8]) -> Result<Version, ProtocolError> {
        let mut r = Reader::new(payload, "VERSION");
        let major = r.u16()?;
        let minor = r.u16()?;
        let mut json = r.rest();
        // The JSON is NUL-terminated on the wire; tolerate any number of NULs.
        while let [head @ .., 0] = json {
            json = head;
        }
        let capabilities = if json.is_empty() {
            None
        } else {
            let text =
                std::str::from_utf8(json).map_err(|e| ProtocolError::BadJson(e.to_string()))?;
            let v: VersionJson =
                serde_json::from_str(text).map_err(|e| ProtocolError::BadJson(e.to_string()))?;
            Some(v.capabilities.unwrap_or_default())
        };
        Ok(Version {
            major,
            minor,
            capabilities,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(256);
        w.u16(self.major).u16(self.minor);
        if let Some(caps) = &self.capabilities {
            let j = VersionJson {
                capabilities: Some(caps.clone()),
                other: Map::new(),
            };
            // Serializing plain data into a String cannot fail.
            let text = serde_json::to_string(&j).unwrap_or_default();
            w.bytes(text.as_bytes()).bytes(&[0]);
        }
        w.into_vec()
    }
}
