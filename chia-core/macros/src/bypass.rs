//! `#[chia::provider]` and `#[chia::condition]`: register a bypass provider or condition under a
//! name, so any binary that links it (a worker, a driver) can run it when a job's bypass plan
//! names it.
//!
//! ```text
//! #[chia::provider]
//! async fn provider_42(call: &chia::bypass::BypassCall) -> Result<i64, String> { Ok(42) }
//! // expands to the function, unchanged, plus
//! mod provider_42 {
//!     pub static PROVIDER: ::chia::bypass::ProviderSpec = ..;   // name "provider_42"
//! }
//! // and one `inventory` submission of the same spec.
//! ```
//!
//! The function takes exactly one parameter (`&BypassCall`), may be `async`, and returns a
//! value or `Result<value, E>` with `E: Display`. A provider's value is any `Serialize` type,
//! or `chia::bypass::Provided` for bytes that are already serialized; a condition's is `bool`.

use proc_macro2::TokenStream as TokenStream2;
use quote::{ToTokens, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::{Error, Ident, ItemFn, ReturnType, Token, Visibility};

use crate::parse_name;
use crate::signature::{here, result_ok_type};

/// Which of the two attributes is expanded.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Provider,
    Condition,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Provider => "bypass provider",
            Kind::Condition => "bypass condition",
        }
    }
}

/// The only option: `name = "..."` (default: the function's identifier).
pub(crate) struct Options {
    name: Option<String>,
}

impl Parse for Options {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut options = Options { name: None };
        while !input.is_empty() {
            let key = input.call(Ident::parse_any)?;
            if key != "name" || options.name.is_some() {
                return Err(Error::new_spanned(&key, "the only option is `name = \"...\"`, given once"));
            }
            input.parse::<Token![=]>()?;
            options.name = Some(parse_name(input)?);
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(options)
    }
}

pub(crate) fn expand(kind: Kind, options: Options, item: &ItemFn) -> syn::Result<TokenStream2> {
    let sig = &item.sig;
    let noun = kind.noun();
    let fn_ident = &sig.ident;
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(Error::new_spanned(&sig.generics, format!("a {noun} cannot be generic")));
    }
    if sig.inputs.len() != 1 {
        return Err(Error::new_spanned(
            &sig.inputs,
            format!("a {noun} takes exactly one parameter, `call: &chia::bypass::BypassCall`"),
        ));
    }
    let name = options.name.unwrap_or_else(|| fn_ident.unraw().to_string());
    let returns_result = match &sig.output {
        ReturnType::Default => {
            return Err(Error::new_spanned(
                sig,
                match kind {
                    Kind::Provider => {
                        "a bypass provider returns the function's value (or `Result<value, E>`)"
                    }
                    Kind::Condition => "a bypass condition returns `bool` (or `Result<bool, E>`)",
                },
            ));
        }
        ReturnType::Type(_, ty) => result_ok_type(ty)?.is_some(),
    };
    let span = here(&sig.output);
    let call = match (sig.asyncness.is_some(), kind) {
        (true, _) => quote!(super::#fn_ident(__chia_call).await),
        // A sync provider may block (read files, run a tool): it must not stall the worker's
        // async threads, which also carry its heartbeats.
        (false, Kind::Provider) => quote!(::chia::__private::run_sync(|| super::#fn_ident(__chia_call))),
        // A condition runs on the caller's thread, which `remote` already blocks.
        (false, Kind::Condition) => quote!(super::#fn_ident(__chia_call)),
    };
    let finish = match kind {
        Kind::Provider => quote_spanned! {span=> ::chia::bypass::IntoProvided::into_provided(__chia_value) },
        Kind::Condition => {
            quote_spanned! {span=> ::std::result::Result::Ok::<bool, ::std::string::String>(__chia_value) }
        }
    };
    let body = if returns_result {
        quote! {
            match #call {
                ::std::result::Result::Ok(__chia_value) => #finish,
                ::std::result::Result::Err(__chia_error) => {
                    ::std::result::Result::Err(::std::format!("{:#}", __chia_error))
                }
            }
        }
    } else {
        quote! { let __chia_value = #call; #finish }
    };
    let (spec_ty, static_ident, field, output) = match kind {
        Kind::Provider => (
            quote!(::chia::bypass::ProviderSpec),
            quote!(PROVIDER),
            quote!(run),
            quote!(::chia::__private::Value),
        ),
        Kind::Condition => {
            (quote!(::chia::bypass::ConditionSpec), quote!(CONDITION), quote!(check), quote!(bool))
        }
    };
    let (mod_vis, item_vis) = match &item.vis {
        Visibility::Inherited => (quote!(), quote!(pub(super))),
        vis => (vis.to_token_stream(), quote!(pub)),
    };
    let cfgs: Vec<_> = item.attrs.iter().filter(|attr| attr.path().is_ident("cfg")).collect();
    let doc = format!("The {noun} [`{fn_ident}()`], registered as `{name}`.");
    Ok(quote! {
        #item

        #(#cfgs)*
        #[doc = #doc]
        #[allow(non_snake_case)]
        #mod_vis mod #fn_ident {
            #[allow(unused_imports)]
            use super::*;

            fn __run<'a>(
                __chia_call: &'a ::chia::bypass::BypassCall,
            ) -> ::chia::bypass::BoxFutureRef<'a, ::std::result::Result<#output, ::std::string::String>> {
                ::std::boxed::Box::pin(async move { #body })
            }

            #[doc = #doc]
            #item_vis static #static_ident: #spec_ty = #spec_ty { name: #name, #field: __run };

            ::chia::__private::inventory::submit! { #spec_ty { name: #name, #field: __run } }
        }
    })
}
