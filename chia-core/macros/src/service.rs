//! `#[chia::service]`: a stateful remote object (like a Ray actor) from an inherent `impl`.
//!
//! ```text
//! #[chia::service]                      // or #[chia::service(name = "stable.Name")]
//! impl Counter {
//!     pub fn new(start: i64) -> Self { .. }             // the constructor (required)
//!     pub fn add(&mut self, x: i64) -> i64 { .. }       // remote: `pub` with `&self`/`&mut self`
//!     pub async fn get(&self) -> i64 { .. }
//! }
//! ```
//!
//! The impl block is emitted unchanged. Next to it:
//!
//! - `pub struct CounterHandle { inner: ::chia::ServiceHandle }` (`Clone`, `Debug`,
//!   `Serialize`, `Deserialize`: it can be passed to and returned from remote calls) with
//!   `start(cx, options, ctor args..)`, `lookup(cx, name, namespace)`, `service()`, `stop()` and
//!   one method per remote method, taking each argument as `impl IntoArg<T>` and returning
//!   `ObjectRef<T>` (`T` as for `#[chia::function]`: the return type, `()`, or the `Ok` type).
//! - In an anonymous `const _` block: the `ServiceSpec` (type name, normalised signature such
//!   as `Counter{new(i64);add(&mut,i64)->i64;get(&,)->i64}` and its hash, the constructor and
//!   the call dispatcher), a static copy the handle's methods refer to, and its `inventory`
//!   registration.
//!
//! Calls run one at a time per instance, under the instance's mutex: a sync method on the
//! blocking pool (holding an owned guard), an async method as part of the call's future (so
//! its future must be `Send`; a `&self` async method therefore needs `Self: Sync`).
//!
//! Only `pub` methods (not `pub(crate)` ..) with a `&self`/`&mut self` receiver are remote;
//! other items are left alone. Parameter and return types follow `#[chia::function]`'s rules;
//! `Self` in them is replaced by the service type.

use proc_macro2::TokenStream as TokenStream2;
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::{Attribute, Error, Ident, ImplItem, ImplItemFn, ItemImpl, Receiver, Token, Type, Visibility};

use crate::parse_name;
use crate::signature::{
    Output, Params, Subject, analyze_output, analyze_params, compact, decode_args, finish, here, peel,
    sig_hash,
};

/// Names the generated handle defines itself; a remote method cannot have them.
const RESERVED: [&str; 5] = ["start", "lookup", "service", "stop", "clone"];

pub(crate) struct Options {
    name: Option<String>,
    /// Calls run at the same time (methods take `&self`) instead of one at a time.
    concurrent: bool,
}

impl Parse for Options {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut options = Options { name: None, concurrent: false };
        while !input.is_empty() {
            let key = input.call(Ident::parse_any)?;
            if key == "concurrent" {
                if options.concurrent {
                    return Err(Error::new_spanned(&key, "option `concurrent` is given twice"));
                }
                options.concurrent = true;
            } else if key == "name" {
                if options.name.is_some() {
                    return Err(Error::new_spanned(&key, "option `name` is given twice"));
                }
                input.parse::<Token![=]>()?;
                options.name = Some(parse_name(input)?);
            } else {
                return Err(Error::new_spanned(
                    &key,
                    format!("unknown option `{key}`; the options are `name = \"...\"` and `concurrent`"),
                ));
            }
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(options)
    }
}

/// The constructor or a remote method, analysed.
struct Callable<'a> {
    method: &'a ImplItemFn,
    /// `None` for the constructor, else whether the receiver is `&mut self`.
    receiver: Option<bool>,
    params: Params,
    output: Output,
}

impl Callable<'_> {
    fn ident(&self) -> &Ident {
        &self.method.sig.ident
    }

    fn is_async(&self) -> bool {
        self.method.sig.asyncness.is_some()
    }

    /// The method's name on the wire (`r#type` → `type`).
    fn name(&self) -> String {
        self.ident().unraw().to_string()
    }

    /// `add(&mut,i64)->i64`, or `new(i64)` for the constructor.
    fn signature(&self) -> String {
        let args: Vec<String> = self.params.params.iter().map(|p| compact(p.ty.to_token_stream())).collect();
        let args = args.join(",");
        match self.receiver {
            None => format!("{}({args})", self.name()),
            Some(mutable) => {
                let receiver = if mutable { "&mut" } else { "&" };
                format!("{}({receiver},{args})->{}", self.name(), self.output.text)
            }
        }
    }
}

/// Collects errors so that every mistake in the block is reported at once.
#[derive(Default)]
struct Errors(Option<Error>);

impl Errors {
    fn push(&mut self, error: Error) {
        match &mut self.0 {
            Some(errors) => errors.combine(error),
            None => self.0 = Some(error),
        }
    }

    fn check<T>(&mut self, result: syn::Result<T>) -> Option<T> {
        result.map_err(|error| self.push(error)).ok()
    }
}

pub(crate) fn expand(options: Options, item: &ItemImpl) -> syn::Result<TokenStream2> {
    if let Some((_, path, _)) = &item.trait_ {
        return Err(Error::new_spanned(
            path,
            "`#[chia::service]` goes on an inherent `impl Type { .. }` block, not a trait impl",
        ));
    }
    if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
        return Err(Error::new_spanned(&item.generics, "services cannot be generic"));
    }
    let self_ty = &*item.self_ty;
    let type_ident = service_ident(self_ty)?;
    let type_name = options.name.unwrap_or_else(|| type_ident.unraw().to_string());
    let handle = format_ident!("{}Handle", type_ident.unraw(), span = type_ident.span());

    let mut errors = Errors::default();
    let mut constructor: Option<Callable> = None;
    let mut methods: Vec<Callable> = Vec::new();
    for impl_item in &item.items {
        let ImplItem::Fn(method) = impl_item else { continue };
        let sig = &method.sig;
        let is_pub = matches!(method.vis, Visibility::Public(_));
        let receiver = sig.receiver();
        if sig.ident == "new" {
            if let Some(receiver) = receiver {
                errors.push(Error::new_spanned(
                    receiver,
                    "`new` is the service's constructor: it cannot take `self` (rename this method)",
                ));
            } else if !is_pub {
                errors.push(Error::new_spanned(&sig.ident, "the service constructor `new` must be `pub`"));
            } else if let Some(callable) = errors.check(constructor_of(method, self_ty, type_ident)) {
                constructor = Some(callable);
            }
        } else if is_pub
            && let Some(receiver) = receiver
            && let Some(callable) = errors.check(remote_method(method, receiver, self_ty, &handle))
        {
            methods.push(callable);
        }
    }
    if let Some(error) = errors.0 {
        return Err(error);
    }
    let Some(constructor) = constructor else {
        return Err(Error::new_spanned(
            self_ty,
            "a service needs a constructor: add `pub fn new(..) -> Self` (or `-> Result<Self, E>`) \
             to this impl block",
        ));
    };

    let signature = {
        let parts: Vec<String> =
            std::iter::once(&constructor).chain(&methods).map(Callable::signature).collect();
        format!("{type_name}{{{}}}", parts.join(";"))
    };
    let sig_hash = sig_hash(&signature);
    let cfgs: Vec<&Attribute> = item.attrs.iter().filter(|attr| attr.path().is_ident("cfg")).collect();

    if options.concurrent
        && let Some(method) = methods.iter().find(|m| m.receiver == Some(true))
    {
        return Err(Error::new_spanned(
            &method.method.sig,
            "the methods of a `concurrent` service run at the same time: take `&self` (use interior \
             mutability for state), or drop `concurrent` to have calls run one at a time",
        ));
    }
    let concurrent = options.concurrent;
    let construct = construct_fn(&constructor, self_ty, &type_name, concurrent);
    let call = call_fn(&methods, self_ty, &type_name, concurrent);
    let handle_impl = handle_impl(&constructor, &methods, self_ty, &handle);
    let handle_doc = format!(
        "Remote handle of a running [`{type_ident}`] service, registered as `{type_name}` \
         (signature `{signature}`)."
    );

    Ok(quote! {
        #item

        #(#cfgs)*
        #[doc = #handle_doc]
        #[derive(Clone, Debug)]
        #[allow(dead_code)]
        pub struct #handle {
            inner: ::chia::ServiceHandle,
        }

        #(#cfgs)*
        const _: () = {
            const __CHIA_SERVICE_SPEC_VALUE: ::chia::__private::ServiceSpec = ::chia::__private::ServiceSpec {
                type_name: #type_name,
                signature: #signature,
                sig_hash: #sig_hash,
                construct: __chia_construct,
                call: __chia_call,
                concurrent: #concurrent,
            };

            static __CHIA_SERVICE_SPEC: ::chia::__private::ServiceSpec = __CHIA_SERVICE_SPEC_VALUE;

            ::chia::__private::inventory::submit! { __CHIA_SERVICE_SPEC_VALUE }

            #construct
            #call
            #handle_impl

            // A handle is a value: it passes to remote calls and comes back in results.
            impl ::chia::__private::serde::Serialize for #handle {
                fn serialize<S: ::chia::__private::serde::Serializer>(
                    &self,
                    serializer: S,
                ) -> ::std::result::Result<S::Ok, S::Error> {
                    ::chia::__private::serde::Serialize::serialize(&self.inner, serializer)
                }
            }

            impl<'de> ::chia::__private::serde::Deserialize<'de> for #handle {
                fn deserialize<D: ::chia::__private::serde::Deserializer<'de>>(
                    deserializer: D,
                ) -> ::std::result::Result<Self, D::Error> {
                    ::chia::ServiceHandle::deserialize_typed(deserializer, &__CHIA_SERVICE_SPEC)
                        .map(|inner| #handle { inner })
                }
            }
        };
    })
}

/// The identifier of `impl Ident` / `impl path::to::Ident`.
fn service_ident(self_ty: &Type) -> syn::Result<&Ident> {
    let message = "a service type must be a named struct or enum, such as `impl Counter`";
    let Type::Path(path) = peel(self_ty) else { return Err(Error::new_spanned(self_ty, message)) };
    if path.qself.is_some() {
        return Err(Error::new_spanned(self_ty, message));
    }
    if let Some(segment) = path.path.segments.iter().find(|s| !s.arguments.is_none()) {
        return Err(Error::new_spanned(&segment.arguments, "services cannot be generic"));
    }
    path.path.segments.last().map(|s| &s.ident).ok_or_else(|| Error::new_spanned(self_ty, message))
}

/// What no callable of a service may be: generic, `unsafe`, variadic or `#[cfg]`-dependent.
fn check_plain(method: &ImplItemFn, what: &str) -> syn::Result<()> {
    let sig = &method.sig;
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(Error::new_spanned(&sig.generics, format!("{what} cannot be generic")));
    }
    if let Some(unsafety) = &sig.unsafety {
        return Err(Error::new_spanned(unsafety, format!("{what} cannot be `unsafe`")));
    }
    if let Some(variadic) = &sig.variadic {
        return Err(Error::new_spanned(variadic, format!("{what} cannot be variadic")));
    }
    if let Some(cfg) = method.attrs.iter().find(|attr| attr.path().is_ident("cfg")) {
        return Err(Error::new_spanned(
            cfg,
            format!(
                "{what} cannot be `#[cfg]`-dependent: the service's signature must be the same in \
                 every build (put `#[cfg]` on the whole impl block, or make the method private)"
            ),
        ));
    }
    Ok(())
}

fn constructor_of<'a>(
    method: &'a ImplItemFn,
    self_ty: &Type,
    type_ident: &Ident,
) -> syn::Result<Callable<'a>> {
    check_plain(method, "the service constructor")?;
    let subject =
        Subject { noun: "service constructor", context_place: "the first parameter", self_ty: Some(self_ty) };
    let params = analyze_params(&method.sig.inputs, &subject)?;
    if let syn::ReturnType::Default = method.sig.output {
        return Err(Error::new_spanned(
            &method.sig,
            "the service constructor must return `Self` or `Result<Self, E>`",
        ));
    }
    let output = analyze_output(&method.sig.output, &subject)?;
    // `Self`, the type's name or a path to it, possibly inside `Result<_, E>`.
    let builds_self = syn::parse2::<Type>(output.value_ty.clone()).is_ok_and(|value_ty| {
        matches!(peel(&value_ty), Type::Path(path)
            if path.qself.is_none() && path.path.segments.last().map(|s| &s.ident) == Some(type_ident))
    });
    if !builds_self {
        return Err(Error::new_spanned(
            &method.sig.output,
            "the service constructor must return `Self` or `Result<Self, E>`",
        ));
    }
    Ok(Callable { method, receiver: None, params, output })
}

fn remote_method<'a>(
    method: &'a ImplItemFn,
    receiver: &Receiver,
    self_ty: &Type,
    handle: &Ident,
) -> syn::Result<Callable<'a>> {
    let ident = &method.sig.ident;
    let name = ident.unraw().to_string();
    if RESERVED.contains(&name.as_str()) {
        return Err(Error::new_spanned(
            ident,
            format!(
                "a remote method cannot be called `{name}`: the generated `{handle}` has its own \
                 `start`, `lookup`, `service`, `stop` and `clone`; rename the method (or make it private)"
            ),
        ));
    }
    check_plain(method, "a remote method")?;
    let mutable = match peel(&receiver.ty) {
        Type::Reference(reference) if matches!(peel(&reference.elem), Type::Path(path) if path.qself.is_none() && path.path.is_ident("Self")) => {
            reference.mutability.is_some()
        }
        _ => {
            return Err(Error::new_spanned(
                receiver,
                "a remote method takes `&self` or `&mut self`: the service keeps its state, so a call \
                 cannot consume or move it",
            ));
        }
    };
    let subject =
        Subject { noun: "remote method", context_place: "right after `self`", self_ty: Some(self_ty) };
    let params = analyze_params(method.sig.inputs.iter().skip(1), &subject)?;
    let output = analyze_output(&method.sig.output, &subject)?;
    Ok(Callable { method, receiver: Some(mutable), params, output })
}

/// `__chia_construct`: decode the arguments, call `new`, box the instance.
fn construct_fn(constructor: &Callable, self_ty: &Type, type_name: &str, concurrent: bool) -> TokenStream2 {
    let function = format!("{type_name}.new");
    let arg_count = constructor.params.params.len();
    let (decoded, decodes) =
        decode_args(&constructor.params.params, &function, &format_ident!("__chia_args"));
    let context_arg = constructor.params.context.arg(&format_ident!("__chia_cx"));
    let ident = constructor.ident();
    let mut call = quote!(<#self_ty>::#ident(#context_arg #(#decoded),*));
    if constructor.is_async() {
        call = quote!(#call.await);
    }
    let value = if constructor.output.returns_result {
        quote_spanned! {constructor.output.span=>
            match #call {
                ::std::result::Result::Ok(__chia_value) => __chia_value,
                ::std::result::Result::Err(__chia_error) => {
                    return ::std::result::Result::Err(::chia::__private::application_error(#function, &__chia_error));
                }
            }
        }
    } else {
        call
    };
    let typed_value = quote_spanned!(constructor.output.span=> let __chia_service: #self_ty = #value;);
    // A concurrent service's calls share the instance: they take an `Arc` of it out of the lock.
    let boxed = if concurrent {
        quote_spanned! {here(self_ty)=>
            ::std::boxed::Box::new(::std::sync::Arc::new(__chia_service)) as ::chia::__private::ServiceInstance
        }
    } else {
        quote_spanned! {here(self_ty)=>
            ::std::boxed::Box::new(__chia_service) as ::chia::__private::ServiceInstance
        }
    };
    quote! {
        #[allow(deprecated, clippy::used_underscore_binding)]
        fn __chia_construct(
            __chia_cx: ::chia::Context,
            __chia_args: ::std::vec::Vec<::chia::__private::ArgValue>,
        ) -> ::chia::__private::BoxFuture<
            ::std::result::Result<::chia::__private::ServiceInstance, ::chia::__private::TaskError>,
        > {
            ::std::boxed::Box::pin(async move {
                ::chia::__private::check_arg_count(#function, #arg_count, &__chia_args)?;
                #decodes
                #typed_value
                ::std::result::Result::Ok(#boxed)
            })
        }
    }
}

/// `__chia_call`: dispatch on the method name, lock the instance, decode, call, encode.
fn call_fn(methods: &[Callable], self_ty: &Type, type_name: &str, concurrent: bool) -> TokenStream2 {
    let arms = methods.iter().map(|method| {
        let name = method.name();
        let function = format!("{type_name}.{name}");
        let arg_count = method.params.params.len();
        let (decoded, decodes) = decode_args(&method.params.params, &function, &format_ident!("__chia_args"));
        let context_arg = method.params.context.arg(&format_ident!("__chia_cx"));
        let ident = method.ident();
        let mutable = method.receiver == Some(true);
        let not_instance = format!("the instance is not a `{type_name}`");
        let (mut_token, downcast) =
            if mutable { (quote!(mut), quote!(downcast_mut)) } else { (quote!(), quote!(downcast_ref)) };
        let this = quote_spanned! {here(self_ty)=>
            let __chia_this = (& #mut_token **__chia_guard)
                .#downcast::<#self_ty>()
                .ok_or_else(|| ::chia::__private::TaskError::InvalidCall {
                    function: ::std::string::String::from(#function),
                    message: ::std::string::String::from(#not_instance),
                })?;
        };
        let mut call = quote!(<#self_ty>::#ident(__chia_this, #context_arg #(#decoded),*));
        if method.is_async() {
            call = quote!(#call.await);
        }
        let finish = finish(&call, &function, &method.output);
        let shared = quote_spanned! {here(self_ty)=>
            let __chia_shared: ::std::sync::Arc<#self_ty> = {
                let __chia_guard = __chia_instance.lock().await;
                (&**__chia_guard)
                    .downcast_ref::<::std::sync::Arc<#self_ty>>()
                    .cloned()
                    .ok_or_else(|| ::chia::__private::TaskError::InvalidCall {
                        function: ::std::string::String::from(#function),
                        message: ::std::string::String::from(#not_instance),
                    })?
            };
        };
        let run = if concurrent && method.is_async() {
            // The lock is held only to clone the `Arc`: calls run at the same time.
            quote! {
                #shared
                let __chia_this: &#self_ty = &__chia_shared;
                #decodes
                #finish
            }
        } else if concurrent {
            quote! {
                #shared
                ::chia::__private::run_blocking(move || {
                    let __chia_this: &#self_ty = &__chia_shared;
                    #decodes
                    #finish
                })
                .await
            }
        } else if method.is_async() {
            // Holds the guard across the await: one call at a time per instance.
            quote! {
                let #mut_token __chia_guard = __chia_instance.lock().await;
                #this
                #decodes
                #finish
            }
        } else {
            // A sync method runs on the blocking pool, still holding the instance's lock.
            quote! {
                let #mut_token __chia_guard = __chia_instance.lock_owned().await;
                ::chia::__private::run_blocking(move || {
                    #this
                    #decodes
                    #finish
                })
                .await
            }
        };
        quote! {
            #name => {
                ::chia::__private::check_arg_count(#function, #arg_count, &__chia_args)?;
                #run
            }
        }
    });
    let unknown = format!("{type_name}.");
    quote! {
        #[allow(
            deprecated,
            unused_variables,
            clippy::used_underscore_binding,
            clippy::match_single_binding,
            clippy::significant_drop_tightening
        )]
        fn __chia_call(
            __chia_instance: ::chia::__private::SharedInstance,
            __chia_cx: ::chia::Context,
            __chia_method: ::std::string::String,
            __chia_args: ::std::vec::Vec<::chia::__private::ArgValue>,
        ) -> ::chia::__private::BoxFuture<
            ::std::result::Result<::chia::__private::Value, ::chia::__private::TaskError>,
        > {
            ::std::boxed::Box::pin(async move {
                match __chia_method.as_str() {
                    #(#arms)*
                    _ => ::std::result::Result::Err(::chia::__private::TaskError::InvalidCall {
                        function: ::std::format!("{}{}", #unknown, __chia_method),
                        message: ::std::string::String::from("the service has no such method"),
                    }),
                }
            })
        }
    }
}

/// `impl CounterHandle { start, lookup, service, stop, one method per remote method }`.
fn handle_impl(constructor: &Callable, methods: &[Callable], self_ty: &Type, handle: &Ident) -> TokenStream2 {
    let type_text = compact(self_ty.to_token_stream());
    let ctor_names: Vec<&Ident> = constructor.params.params.iter().map(|p| &p.ident).collect();
    let clash = |name: &str| ctor_names.iter().any(|n| *n == name);
    let cx = if clash("cx") { format_ident!("__chia_cx") } else { format_ident!("cx") };
    let options = if clash("options") { format_ident!("__chia_options") } else { format_ident!("options") };
    let ctor_inputs = constructor.params.params.iter().map(|p| {
        let (ident, ty) = (&p.ident, &p.ty);
        quote!(#ident: impl ::chia::IntoArg<#ty>)
    });
    let start_doc = format!(
        "Starts a `{type_text}` service built by [`{type_text}::new`] with these arguments, placed as \
         `options` says.\n\n# Errors\n\nWhen the service cannot be placed or started, or `new` fails."
    );

    let handle_methods = methods.iter().map(|method| {
        let ident = method.ident();
        let name = method.name();
        let value_ty = &method.output.value_ty;
        let names: Vec<&Ident> = method.params.params.iter().map(|p| &p.ident).collect();
        let inputs = method.params.params.iter().map(|p| {
            let (ident, ty) = (&p.ident, &p.ty);
            quote!(#ident: impl ::chia::IntoArg<#ty>)
        });
        let docs: Vec<&Attribute> =
            method.method.attrs.iter().filter(|attr| attr.path().is_ident("doc")).collect();
        let separator = if docs.is_empty() { quote!() } else { quote!(#[doc = ""]) };
        let call_doc = format!(
            "Calls [`{type_text}::{ident}`] on the service; returns the result's `ObjectRef` at once."
        );
        quote! {
            #(#docs)*
            #separator
            #[doc = #call_doc]
            pub fn #ident(&self, #(#inputs),*) -> ::chia::ObjectRef<#value_ty> {
                self.inner.call::<#value_ty>(#name, ::std::vec![#(::chia::IntoArg::into_arg(#names)),*])
            }
        }
    });

    quote! {
        #[allow(dead_code, clippy::too_many_arguments, clippy::used_underscore_binding)]
        impl #handle {
            #[doc = #start_doc]
            pub async fn start(
                #cx: &::chia::Context,
                #options: ::chia::ServiceOptions,
                #(#ctor_inputs),*
            ) -> ::std::result::Result<#handle, ::chia::Error> {
                ::chia::ServiceHandle::start(
                    #cx,
                    &__CHIA_SERVICE_SPEC,
                    #options,
                    ::std::vec![#(::chia::IntoArg::into_arg(#ctor_names)),*],
                )
                .await
                .map(|inner| #handle { inner })
            }

            /// Finds the running service registered under `name` (in `namespace`, or the
            /// default one), checking that it is this type with the same signature.
            ///
            /// # Errors
            ///
            /// When the lookup fails or the service found has another type or signature.
            pub async fn lookup(
                cx: &::chia::Context,
                name: &str,
                namespace: ::std::option::Option<&str>,
            ) -> ::std::result::Result<::std::option::Option<#handle>, ::chia::Error> {
                ::chia::ServiceHandle::lookup(cx, &__CHIA_SERVICE_SPEC, name, namespace)
                    .await
                    .map(|found| found.map(|inner| #handle { inner }))
            }

            /// The untyped handle of the service.
            pub fn service(&self) -> &::chia::ServiceHandle {
                &self.inner
            }

            /// Stops the service.
            ///
            /// # Errors
            ///
            /// When the cluster cannot be reached.
            pub async fn stop(&self) -> ::std::result::Result<(), ::chia::Error> {
                self.inner.stop().await
            }

            #(#handle_methods)*
        }
    }
}
